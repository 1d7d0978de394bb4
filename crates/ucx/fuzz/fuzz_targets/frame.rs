#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pnp_ucx::fuzzing::frame(data));
