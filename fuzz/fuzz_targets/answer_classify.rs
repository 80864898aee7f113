#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sni_guard_fuzz::check_answer(data));
