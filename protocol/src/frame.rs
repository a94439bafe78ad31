//! Length-delimited JSON frames: a 4-byte big-endian length, then that many bytes of
//! JSON. Control traffic is a handful of small messages per tunnel, so readability and
//! extensibility (see [`crate::message`]) win over compactness; the size cap keeps a
//! hostile peer from making us allocate.

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// No control message comes near this; anything larger is an attack or a bug.
pub const MAX_FRAME_LEN: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("control message of {0} bytes exceeds the {MAX_FRAME_LEN}-byte limit")]
    TooLarge(usize),
    #[error("control message is not valid: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("stream ended before a complete control message arrived")]
    Truncated,
    #[error("I/O error reading a control message: {0}")]
    Io(std::io::Error),
}

pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    let body = serde_json::to_vec(message).expect("control messages always serialize");
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    frame
}

pub async fn write<T: Serialize, W: AsyncWrite + Unpin>(
    writer: &mut W,
    message: &T,
) -> std::io::Result<()> {
    writer.write_all(&encode(message)).await
}

/// The body length announced by a frame's 4-byte header, refused before anything is
/// allocated when it exceeds [`MAX_FRAME_LEN`].
pub fn body_len(header: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len)
}

pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    Ok(serde_json::from_slice(body)?)
}

/// Decodes the first frame in `buf`: the message and the bytes it took, or `None`
/// while the frame is incomplete.
pub fn decode<T: DeserializeOwned>(buf: &[u8]) -> Result<Option<(T, usize)>, FrameError> {
    let Some((header, rest)) = buf.split_first_chunk::<4>() else {
        return Ok(None);
    };
    let len = body_len(*header)?;
    match rest.get(..len) {
        Some(body) => Ok(Some((decode_body(body)?, 4 + len))),
        None => Ok(None),
    }
}

/// Maps the end of a stream in the middle of a frame to [`FrameError::Truncated`].
pub fn eof_is_truncation(error: std::io::Error) -> FrameError {
    match error.kind() {
        std::io::ErrorKind::UnexpectedEof => FrameError::Truncated,
        _ => FrameError::Io(error),
    }
}

pub async fn read<T: DeserializeOwned, R: AsyncRead + Unpin>(
    reader: &mut R,
) -> Result<T, FrameError> {
    let mut header = [0u8; 4];
    reader
        .read_exact(&mut header)
        .await
        .map_err(eof_is_truncation)?;
    let mut body = vec![0u8; body_len(header)?];
    reader
        .read_exact(&mut body)
        .await
        .map_err(eof_is_truncation)?;
    decode_body(&body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Hello;

    #[tokio::test]
    async fn round_trips() {
        let hello = Hello {
            token: "t".into(),
            remote_port: Some(15432),
        };
        let bytes = encode(&hello);
        let decoded: Hello = read(&mut bytes.as_slice()).await.unwrap();
        assert_eq!(decoded, hello);
    }

    #[tokio::test]
    async fn refuses_oversized_frames_before_reading_them() {
        let bytes = (u32::MAX).to_be_bytes();
        let error = read::<Hello, _>(&mut bytes.as_slice()).await.unwrap_err();
        assert!(matches!(error, FrameError::TooLarge(_)), "{error}");
    }

    #[tokio::test]
    async fn reports_garbage_and_truncation() {
        let mut garbage = 5u32.to_be_bytes().to_vec();
        garbage.extend_from_slice(b"hello");
        let error = read::<Hello, _>(&mut garbage.as_slice()).await.unwrap_err();
        assert!(matches!(error, FrameError::Malformed(_)), "{error}");

        let truncated = &encode(&Hello {
            token: "t".into(),
            remote_port: None,
        })[..6];
        let error = read::<Hello, _>(&mut &truncated[..]).await.unwrap_err();
        assert!(matches!(error, FrameError::Truncated), "{error}");
    }

    #[test]
    fn decode_waits_for_a_whole_frame_and_reports_its_length() {
        let hello = Hello {
            token: "t".into(),
            remote_port: None,
        };
        let mut bytes = encode(&hello);
        let len = bytes.len();
        for cut in 0..len {
            assert!(
                decode::<Hello>(&bytes[..cut]).unwrap().is_none(),
                "cut at {cut}"
            );
        }
        bytes.extend_from_slice(b"next");
        assert_eq!(decode::<Hello>(&bytes).unwrap(), Some((hello, len)));
        let oversized = (MAX_FRAME_LEN as u32 + 1).to_be_bytes();
        assert!(matches!(
            decode::<Hello>(&oversized),
            Err(FrameError::TooLarge(_))
        ));
    }
}
