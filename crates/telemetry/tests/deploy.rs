//! The Grafana dashboard and the Prometheus rules in `deploy/` read only series this crate
//! exports (or the documented series of issue 4), with labels those series carry, so neither can
//! silently drift from the code.

use std::collections::BTreeSet;
use std::path::PathBuf;

use pnp_telemetry::Metrics;

/// Series the resilience policies (issue 4) will export, and their labels. The rules and the
/// dashboard already use them; once `Metrics` exports one, it is checked like the others.
const ISSUE_4_SERIES: &[&str] = &[
    "pnp_retries_total",
    "pnp_retry_budget_tokens",
    "pnp_shed_total",
    "pnp_breaker_state",
    "pnp_queue_depth",
];
const ISSUE_4_LABELS: &[&str] = &["method", "job", "reason", "upstream"];
/// Labels Prometheus adds itself: target labels and histogram buckets.
const PROMETHEUS_LABELS: &[&str] = &["le", "instance", "job"];
/// Target labels of a scrape in Kubernetes (the PodMonitor, deploy/k8s/prometheus/
/// kubernetes-pods.yml), which prometheus-adapter maps to resources.
const KUBERNETES_LABELS: &[&str] = &["namespace", "pod"];

fn deploy_file(path: &str) -> String {
    let full = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy")
        .join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("reading {}: {e}", full.display()))
}

/// What `/metrics` shows after one call has gone through every recorder.
fn exported() -> (BTreeSet<String>, BTreeSet<String>) {
    let metrics = Metrics::new();
    let mut call = metrics.call("/demo.llm.v1.Generator/Generate", Some("chat"), "h2");
    let (messages, bytes) = metrics.request_counters("h2");
    messages.inc();
    bytes.inc_by(8);
    call.response_message(3);
    call.response_message(4);
    call.finish(0);
    metrics.clock_expired("deadline");
    let text = metrics.encode();

    let mut names = BTreeSet::new();
    let mut labels = BTreeSet::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let end = line.find(['{', ' ']).unwrap_or(line.len());
        names.insert(line[..end].to_owned());
        if let Some(set) = line[end..].strip_prefix('{') {
            let set = &set[..set.find('}').expect("closing brace")];
            for pair in set.split("\",") {
                let name = pair.split('=').next().expect("label name");
                labels.insert(name.trim_start_matches(',').to_owned());
            }
        }
    }
    assert!(names.contains("pnp_calls_total"), "{text}");
    (names, labels)
}

/// The names a PromQL expression reads: metric names, recording rule names (with a `:`) and
/// label names (in matchers and in `by`, `without`, `on`, `ignoring`, `group_left`,
/// `group_right` lists).
#[derive(Debug, Default)]
struct Names {
    series: BTreeSet<String>,
    labels: BTreeSet<String>,
}

const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

fn read_expr(expr: &str, names: &mut Names) {
    // Quoted strings (label values, regexes) are not names.
    let mut text = String::new();
    let mut quote = None;
    let mut escaped = false;
    for c in expr.chars() {
        match quote {
            Some(q) => {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == q {
                    quote = None;
                    text.push_str("\"\"");
                }
            }
            None if c == '"' || c == '\'' || c == '`' => quote = Some(c),
            None => text.push(c),
        }
    }
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    let mut depth_braces = 0;
    // Set while inside the parentheses of a label list.
    let mut list_depth: Option<usize> = None;
    let mut parens = 0usize;
    let mut pending_list = false;
    while i < chars.len() {
        let c = chars[i];
        if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "_:".contains(chars[i])) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let rest: String = chars[i..].iter().collect();
            let rest = rest.trim_start();
            if depth_braces > 0 || list_depth.is_some() {
                if depth_braces == 0 || rest.starts_with(['=', '!']) {
                    names.labels.insert(word);
                }
            } else if LABEL_LISTS.contains(&word.as_str()) {
                pending_list = true;
            } else if word.starts_with("pnp_") || word.contains(':') {
                names.series.insert(word);
            }
            continue;
        }
        // Durations such as 5m or 1.5 are numbers, not names.
        if c.is_ascii_digit() {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
            continue;
        }
        match c {
            '{' => depth_braces += 1,
            '}' => depth_braces -= 1,
            '(' => {
                parens += 1;
                if pending_list {
                    list_depth = Some(parens);
                    pending_list = false;
                }
            }
            ')' => {
                if list_depth == Some(parens) {
                    list_depth = None;
                }
                parens -= 1;
            }
            c if !c.is_whitespace() => pending_list = false,
            _ => {}
        }
        i += 1;
    }
}

/// Every `expr` (and Grafana variable query) anywhere in a JSON document.
fn json_exprs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr" | "definition", serde_json::Value::String(expr)) => {
                        out.push(expr.clone())
                    }
                    _ => json_exprs(value, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| json_exprs(v, out)),
        _ => {}
    }
}

/// A Grafana variable query such as `label_values(pnp_calls_total{job=~"$job"}, method)` is
/// PromQL plus a label name.
fn grafana_query(expr: &str) -> String {
    match expr
        .strip_prefix("label_values(")
        .and_then(|e| e.strip_suffix(')'))
    {
        Some(args) => match args.rsplit_once(',') {
            Some((selector, label)) => format!("sum by ({label}) ({selector})"),
            None => format!("sum by ({args}) (up)"),
        },
        None => expr.to_owned(),
    }
}

struct Rules {
    exprs: Vec<String>,
    recorded: BTreeSet<String>,
    alerts: BTreeSet<String>,
}

fn rules() -> Rules {
    let doc: serde_yaml::Value =
        serde_yaml::from_str(&deploy_file("prometheus/pnp-rules.yml")).expect("rules are YAML");
    let mut rules = Rules {
        exprs: Vec::new(),
        recorded: BTreeSet::new(),
        alerts: BTreeSet::new(),
    };
    let groups = doc["groups"].as_sequence().expect("groups");
    for group in groups {
        for rule in group["rules"].as_sequence().expect("rules") {
            let expr = rule["expr"].as_str().expect("every rule has an expr");
            rules.exprs.push(expr.to_owned());
            if let Some(record) = rule["record"].as_str() {
                rules.recorded.insert(record.to_owned());
            }
            if let Some(alert) = rule["alert"].as_str() {
                rules.alerts.insert(alert.to_owned());
            }
        }
    }
    rules
}

fn check(source: &str, exprs: &[String], recorded: &BTreeSet<String>) -> Vec<String> {
    let (series, labels) = exported();
    let mut problems = Vec::new();
    for expr in exprs {
        let mut names = Names::default();
        read_expr(expr, &mut names);
        for name in &names.series {
            let known = if name.contains(':') {
                recorded.contains(name)
            } else {
                series.contains(name) || ISSUE_4_SERIES.contains(&name.as_str())
            };
            if !known {
                problems.push(format!("{source}: unknown series {name} in `{expr}`"));
            }
        }
        for label in &names.labels {
            let known = labels.contains(label)
                || ISSUE_4_LABELS.contains(&label.as_str())
                || PROMETHEUS_LABELS.contains(&label.as_str());
            if !known {
                problems.push(format!("{source}: unknown label {label} in `{expr}`"));
            }
        }
    }
    problems
}

#[test]
fn the_reader_finds_series_and_labels() {
    let mut names = Names::default();
    read_expr(
        r#"sum by (job, le) (rate(pnp_x_bucket{method=~"a|b",job!="x"}[5m])) / on () group_left () job:pnp_y:rate5m > 0.5"#,
        &mut names,
    );
    assert_eq!(
        names.series.into_iter().collect::<Vec<_>>(),
        ["job:pnp_y:rate5m", "pnp_x_bucket"]
    );
    assert_eq!(
        names.labels.into_iter().collect::<Vec<_>>(),
        ["job", "le", "method"]
    );
}

#[test]
fn the_rules_read_only_exported_series() {
    let rules = rules();
    assert!(rules.recorded.contains("job:pnp_call_errors:ratio_rate5m"));
    for alert in [
        "PnpDown",
        "PnpJobFailingWhileRetrying",
        "PnpTimeToFirstTokenOverSlo",
        "PnpShedding",
        "PnpBreakerOpen",
        "PnpUpstreamUnavailable",
        "PnpDeadlineExceeded",
    ] {
        assert!(rules.alerts.contains(alert), "no alert {alert}");
    }
    let problems = check("pnp-rules.yml", &rules.exprs, &rules.recorded);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_dashboard_reads_only_exported_series() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&deploy_file("grafana/pnp-dashboard.json"))
            .expect("the dashboard is JSON");
    assert!(
        dashboard["schemaVersion"].as_u64() >= Some(38),
        "schemaVersion"
    );
    let variables: Vec<_> = dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
        .iter()
        .map(|v| (v["name"].as_str(), v["type"].as_str()))
        .collect();
    for expected in [
        (Some("datasource"), Some("datasource")),
        (Some("job"), Some("query")),
        (Some("method"), Some("query")),
    ] {
        assert!(variables.contains(&expected), "variable {expected:?}");
    }
    let mut exprs = Vec::new();
    json_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() > 10, "{exprs:?}");
    let exprs: Vec<_> = exprs.iter().map(|e| grafana_query(e)).collect();
    let problems = check("pnp-dashboard.json", &exprs, &rules().recorded);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_autoscaler_reads_only_exported_series() {
    let values: serde_yaml::Value =
        serde_yaml::from_str(&deploy_file("k8s/prometheus-adapter/values.yaml"))
            .expect("the adapter values are YAML");
    let mut exprs = Vec::new();
    let mut served = BTreeSet::new();
    for rule in values["rules"]["custom"]
        .as_sequence()
        .expect("rules.custom")
    {
        let series_query = rule["seriesQuery"].as_str().expect("seriesQuery");
        let series = series_query.split('{').next().expect("a series name");
        exprs.push(series_query.to_owned());
        // The query as the adapter runs it for the pods of one namespace.
        exprs.push(
            rule["metricsQuery"]
                .as_str()
                .expect("metricsQuery")
                .replace("<<.Series>>", series)
                .replace("<<.LabelMatchers>>", r#"namespace="pnp",pod=~"pnp-.*""#)
                .replace("<<.GroupBy>>", "pod"),
        );
        served.insert(rule["name"]["as"].as_str().expect("name.as").to_owned());
    }
    let problems: Vec<_> = check("prometheus-adapter/values.yaml", &exprs, &BTreeSet::new())
        .into_iter()
        .filter(|p| {
            !KUBERNETES_LABELS
                .iter()
                .any(|l| p.contains(&format!("unknown label {l} ")))
        })
        .collect();
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // Every custom metric the HPA scales on is one the adapter serves.
    let hpa: serde_yaml::Value =
        serde_yaml::from_str(&deploy_file("k8s/base/horizontalpodautoscaler.yaml"))
            .expect("the HPA is YAML");
    let mut wanted = Vec::new();
    for metric in hpa["spec"]["metrics"].as_sequence().expect("metrics") {
        if let Some(name) = metric["pods"]["metric"]["name"].as_str() {
            wanted.push(name.to_owned());
        }
    }
    assert_eq!(wanted, ["pnp_active_streams", "pnp_queue_depth"]);
    for name in &wanted {
        assert!(
            served.contains(name),
            "the adapter does not serve {name}: {served:?}"
        );
    }
}
