//! The token the client presents, from the command line or from a file that is read
//! again when it may have changed (a rotated Kubernetes Secret is swapped in place by
//! the kubelet).

use std::path::Path;

use crate::client::ClientError;
use crate::config::TokenSource;

#[derive(Debug)]
pub struct Token {
    source: TokenSource,
    current: String,
}

impl Token {
    pub fn load(source: TokenSource) -> Result<Self, ClientError> {
        let current = match &source {
            TokenSource::Literal(token) => token.trim().to_owned(),
            TokenSource::File(path) => read(path).map_err(ClientError::Setup)?,
        };
        if current.is_empty() {
            return Err(ClientError::Setup(
                "the token is empty: pass the output of `localup generate-token`".into(),
            ));
        }
        Ok(Self { source, current })
    }

    pub fn current(&self) -> &str {
        &self.current
    }

    /// Whether a newer token can appear without restarting the client.
    pub fn renewable(&self) -> bool {
        matches!(self.source, TokenSource::File(_))
    }

    /// Reads the token file again; returns true when it holds a different token. A
    /// file that cannot be read right now (mid-rotation) keeps the current token.
    pub fn refresh(&mut self) -> bool {
        let TokenSource::File(path) = &self.source else {
            return false;
        };
        match read(path) {
            Ok(token) if !token.is_empty() && token != self.current => {
                self.current = token;
                true
            }
            Ok(_) => false,
            Err(problem) => {
                tracing::warn!(%problem, "keeping the current token");
                false
            }
        }
    }
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path)
        .map(|text| text.trim().to_owned())
        .map_err(|error| format!("cannot read --token-file {}: {error}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_file_is_reread_when_it_changes() {
        let dir = std::env::temp_dir().join(format!("localup-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "first\n").unwrap();
        let mut token = Token::load(TokenSource::File(path.clone())).unwrap();
        assert_eq!(token.current(), "first");
        assert!(!token.refresh());
        std::fs::write(&path, "second").unwrap();
        assert!(token.refresh());
        assert_eq!(token.current(), "second");
        std::fs::remove_file(&path).unwrap();
        assert!(!token.refresh(), "a missing file keeps the token");
        assert_eq!(token.current(), "second");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn missing_and_empty_tokens_are_refused_with_the_reason() {
        let missing = Token::load(TokenSource::File("/nonexistent/token".into())).unwrap_err();
        assert!(missing.to_string().contains("cannot read --token-file"));
        let empty = Token::load(TokenSource::Literal(" ".into())).unwrap_err();
        assert!(empty.to_string().contains("token is empty"));
    }
}
