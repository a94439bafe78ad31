//! Arbitrary bytes through the control-frame decoder, read as every message type a peer
//! can send (and as token claims, which go through the same JSON machinery). Besides
//! not panicking, `frame::decode` must:
//! - report exactly the frame its header announces (`4 + len` bytes, never more than it
//!   was given) and decide from those bytes alone, whatever follows them;
//! - call a frame incomplete exactly while fewer bytes than that are there;
//! - refuse a header above `MAX_FRAME_LEN` with `TooLarge`, without reading the body;
//! - give back the same message for the message re-encoded with `frame::encode`.
//!
//! Frames that follow a decoded one are decoded in turn, as the relay and client read
//! them off a stream.

#![no_main]

use std::fmt::Debug;

use libfuzzer_sys::fuzz_target;
use localup_protocol::frame::{self, FrameError, MAX_FRAME_LEN};
use localup_protocol::message::{
    ClientMessage, Hello, HelloReply, RelayMessage, StreamHeader, StreamReply,
};
use localup_protocol::token::Claims;
use serde::Serialize;
use serde::de::DeserializeOwned;

fuzz_target!(|data: &[u8]| {
    check_stream::<Hello>(data);
    check_stream::<HelloReply>(data);
    check_stream::<ClientMessage>(data);
    check_stream::<RelayMessage>(data);
    check_stream::<StreamHeader>(data);
    check_stream::<StreamReply>(data);
    check_stream::<Claims>(data);
});

/// Decodes frame after frame from `data` until one is incomplete or refused.
fn check_stream<T>(mut data: &[u8])
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    while let Some(used) = check_frame::<T>(data) {
        data = &data[used..];
    }
}

/// Checks the first frame of `buf`; the bytes it took when it decoded.
fn check_frame<T>(buf: &[u8]) -> Option<usize>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let announced = buf
        .first_chunk::<4>()
        .map(|header| u32::from_be_bytes(*header) as usize);
    let type_name = std::any::type_name::<T>();
    match frame::decode::<T>(buf) {
        Ok(None) => {
            if let Some(len) = announced {
                assert!(len <= MAX_FRAME_LEN, "{type_name}: oversized header accepted");
                assert!(
                    buf.len() < 4 + len,
                    "{type_name}: a whole frame of {len} bytes called incomplete"
                );
            }
            None
        }
        Ok(Some((message, used))) => {
            let len = announced.expect("a decoded frame has a header");
            assert!(len <= MAX_FRAME_LEN, "{type_name}: oversized frame decoded");
            assert_eq!(used, 4 + len, "{type_name}: consumed length is not the header's");
            assert!(used <= buf.len(), "{type_name}: consumed more than it was given");

            // Only the frame's own bytes count: the frame alone decodes the same...
            let alone = frame::decode::<T>(&buf[..used]);
            assert!(
                matches!(&alone, Ok(Some((again, n))) if *again == message && *n == used),
                "{type_name}: the frame alone decodes as {alone:?}, not {message:?}"
            );
            // ...and one byte less is not a frame yet.
            let short = frame::decode::<T>(&buf[..used - 1]);
            assert!(
                matches!(short, Ok(None)),
                "{type_name}: a cut frame decodes as {short:?}"
            );

            check_reencoding(&message);
            Some(used)
        }
        Err(FrameError::TooLarge(len)) => {
            assert_eq!(Some(len), announced, "{type_name}: TooLarge reports another length");
            assert!(len > MAX_FRAME_LEN, "{type_name}: {len} bytes called too large");
            None
        }
        Err(FrameError::Malformed(error)) => {
            let len = announced.expect("a malformed frame has a header");
            assert!(
                len <= MAX_FRAME_LEN && buf.len() >= 4 + len,
                "{type_name}: judged malformed before the whole frame arrived"
            );
            let alone = frame::decode::<T>(&buf[..4 + len]);
            assert!(
                matches!(alone, Err(FrameError::Malformed(_))),
                "{type_name}: malformed ({error}) with trailing bytes, {alone:?} without"
            );
            None
        }
        Err(error) => panic!("{type_name}: decode from memory reported {error}"),
    }
}

/// A decoded message, encoded again, decodes to itself.
fn check_reencoding<T>(message: &T)
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let type_name = std::any::type_name::<T>();
    let encoded = frame::encode(message);
    let body_len = encoded.len() - 4;
    assert_eq!(
        u32::from_be_bytes(*encoded.first_chunk::<4>().unwrap()) as usize,
        body_len,
        "{type_name}: encode wrote a wrong length"
    );
    match frame::decode::<T>(&encoded) {
        Ok(Some((back, used))) => {
            assert_eq!(&back, message, "{type_name}: re-encoding changed the message");
            assert_eq!(used, encoded.len());
        }
        // Encoding may spell out what the input left implicit (`"expires_at":null`,
        // escapes), so a message received near the cap can re-encode above it.
        Err(FrameError::TooLarge(_)) if body_len > MAX_FRAME_LEN => {}
        other => panic!("{type_name}: {message:?} re-encoded decodes as {other:?}"),
    }
}
