#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pnp_wire::fuzzing::trailer_block(data));
