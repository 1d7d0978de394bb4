//! Only clients with a certificate from the configured CA (and, with an allow-list, a name on
//! it) get in; each refusal happens in the TLS handshake.

use std::time::Duration;

use pnp_control::proto::ListJobsRequest;
use pnp_control::{ClientTls, Identity};

use crate::support::{eventually, Ca, Harness, CLIENT_NAME};

/// Connects and calls ListJobs; the error text when either fails.
async fn list_jobs(harness: &Harness, tls: &ClientTls) -> Result<(), String> {
    let mut client = pnp_control::connect(&harness.addr.to_string(), tls)
        .await
        .map_err(|e| format!("{e:?}"))?;
    client
        .list_jobs(ListJobsRequest {})
        .await
        .map(|_| ())
        .map_err(|e| format!("{e:?}"))
}

/// Asserts the server refused the handshake, for a reason that contains `why`.
async fn assert_refused(harness: &Harness, identity: Option<Identity>, why: &str) {
    let before = harness.plane.rejected_handshakes();
    let result = list_jobs(harness, &harness.client_tls(identity)).await;
    assert!(result.is_err(), "the call went through");
    assert!(
        eventually(Duration::from_secs(5), || harness
            .plane
            .rejected_handshakes()
            == before + 1)
        .await,
        "the server did not refuse a handshake: {result:?}"
    );
    let reason = harness.plane.last_rejection().unwrap_or_default();
    assert!(reason.contains(why), "refused for {reason}, not {why}");
}

#[tokio::test]
async fn a_client_certificate_from_the_ca_gets_in() {
    let harness = Harness::start(|_| {}).await;
    let tls = harness.client_tls(Some(harness.ca.client(CLIENT_NAME)));
    list_jobs(&harness, &tls).await.expect("valid client");
    // Any name the CA signed, when there is no allow-list.
    let tls = harness.client_tls(Some(harness.ca.client("someone-else")));
    list_jobs(&harness, &tls).await.expect("valid client");
    assert_eq!(harness.plane.rejected_handshakes(), 0);
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let harness = Harness::start(|_| {}).await;
    assert_refused(&harness, None, "NoCertificatesPresented").await;
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() {
    let harness = Harness::start(|_| {}).await;
    let stranger = Ca::new("another CA");
    assert_refused(
        &harness,
        Some(stranger.client(CLIENT_NAME)),
        "UnknownIssuer",
    )
    .await;
}

#[tokio::test]
async fn an_expired_certificate_is_refused() {
    let harness = Harness::start(|_| {}).await;
    assert_refused(
        &harness,
        Some(harness.ca.expired_client(CLIENT_NAME)),
        "Expired",
    )
    .await;
}

#[tokio::test]
async fn a_name_not_on_the_allow_list_is_refused_and_one_on_it_gets_in() {
    let harness = Harness::start(|options| {
        options.tls.allowed_clients = vec![CLIENT_NAME.into(), "ops-console".into()];
    })
    .await;
    assert_refused(
        &harness,
        Some(harness.ca.client("intruder")),
        "ApplicationVerificationFailure",
    )
    .await;
    for name in [CLIENT_NAME, "ops-console"] {
        let tls = harness.client_tls(Some(harness.ca.client(name)));
        list_jobs(&harness, &tls).await.expect(name);
    }
    assert_eq!(harness.plane.rejected_handshakes(), 1);
}

#[tokio::test]
async fn the_client_refuses_a_server_certificate_for_another_name() {
    let harness = Harness::start(|_| {}).await;
    let mut tls = harness.client_tls(Some(harness.ca.client(CLIENT_NAME)));
    tls.server_name = "control.example.com".into();
    let error = list_jobs(&harness, &tls)
        .await
        .expect_err("wrong server name");
    assert!(error.contains("NotValidForName"), "{error}");
}
