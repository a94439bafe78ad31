//! Arbitrary bytes as the start of a client's control stream, through the relay's hello
//! handling (`localup_relay::hello::evaluate`) with a fixed secret. Whatever arrives,
//! the relay must not panic; it may only authenticate a hello whose token really is
//! signed with its secret (checked independently), and every refusal tells the client
//! why. See `localup_fuzz::check_hello_outcome` for the full list.
//!
//! Random bytes rarely carry a valid signature: `relay_hello_structured` mints tokens
//! with the secret so that claim handling is reached too.

#![no_main]

use libfuzzer_sys::fuzz_target;
use localup_fuzz::{SECRET, check_hello_outcome, show_outcome};
use localup_relay::hello;

fuzz_target!(|data: &[u8]| {
    let outcome = hello::evaluate(data, SECRET);
    check_hello_outcome(data, SECRET, &outcome);
    show_outcome(&outcome);
});
