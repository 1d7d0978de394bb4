//! Links the system UCX (found with pkg-config) when the `ucx` feature is on; does nothing
//! otherwise, so the default build of the workspace needs no libucx.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "ucx")]
    {
        // Debian's libucx-dev ships `ucx.pc` (UCX 1.13: -lucp -luct -lucs -lucm).
        if let Err(e) = pkg_config::Config::new()
            .atleast_version("1.13")
            .probe("ucx")
        {
            panic!(
                "pnp-ucx: the `ucx` feature needs the system UCX >= 1.13 \
                 (apt-get install libucx-dev pkg-config): {e}"
            );
        }
    }
}
