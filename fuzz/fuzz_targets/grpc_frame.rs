#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| modelgate::fuzzing::grpc_frame(data));
