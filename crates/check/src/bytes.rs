//! Byte strings for keys and values, readable in JSON and in explanations.
//!
//! etcd keys and values are arbitrary bytes, but almost every history a test records uses
//! UTF-8 text. `Bytes` therefore serializes as a JSON string when its content is valid UTF-8
//! and as an array of numbers otherwise; both forms are accepted when reading, so the encoding
//! is lossless and a dumped history stays easy to read and to edit by hand.

use std::fmt;
use std::ops::Deref;

use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An owned byte string: a key or a value of the key-value store.
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bytes(pub Vec<u8>);

impl Bytes {
    /// The bytes as a slice.
    pub fn as_slice(&self) -> &[u8] {
        &self.0
    }
}

impl Deref for Bytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl From<&str> for Bytes {
    fn from(text: &str) -> Self {
        Bytes(text.as_bytes().to_vec())
    }
}

impl From<String> for Bytes {
    fn from(text: String) -> Self {
        Bytes(text.into_bytes())
    }
}

impl From<&[u8]> for Bytes {
    fn from(bytes: &[u8]) -> Self {
        Bytes(bytes.to_vec())
    }
}

impl From<Vec<u8>> for Bytes {
    fn from(bytes: Vec<u8>) -> Self {
        Bytes(bytes)
    }
}

/// Text is shown quoted with Rust's escapes; other bytes as a `b"…"` literal, so that two
/// different byte strings never print the same.
impl fmt::Display for Bytes {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match std::str::from_utf8(&self.0) {
            Ok(text) => write!(formatter, "{text:?}"),
            Err(_) => write!(formatter, "b\"{}\"", self.0.escape_ascii()),
        }
    }
}

impl fmt::Debug for Bytes {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, formatter)
    }
}

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(&self.0) {
            Ok(text) => serializer.serialize_str(text),
            Err(_) => serializer.collect_seq(self.0.iter()),
        }
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(BytesVisitor)
    }
}

/// Accepts the two forms `Bytes` writes: a string (its UTF-8 bytes) or a sequence of numbers.
struct BytesVisitor;

impl<'de> Visitor<'de> for BytesVisitor {
    type Value = Bytes;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a string or an array of bytes")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Bytes, E> {
        Ok(Bytes::from(text))
    }

    fn visit_string<E: de::Error>(self, text: String) -> Result<Bytes, E> {
        Ok(Bytes::from(text))
    }

    fn visit_bytes<E: de::Error>(self, bytes: &[u8]) -> Result<Bytes, E> {
        Ok(Bytes::from(bytes))
    }

    fn visit_byte_buf<E: de::Error>(self, bytes: Vec<u8>) -> Result<Bytes, E> {
        Ok(Bytes(bytes))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut sequence: A) -> Result<Bytes, A::Error> {
        let mut bytes = Vec::with_capacity(sequence.size_hint().unwrap_or(0));
        while let Some(byte) = sequence.next_element::<u8>()? {
            bytes.push(byte);
        }
        Ok(Bytes(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips_as_a_json_string() {
        let bytes = Bytes::from("key/1");
        let json = serde_json::to_string(&bytes).unwrap();
        assert_eq!(json, "\"key/1\"");
        assert_eq!(serde_json::from_str::<Bytes>(&json).unwrap(), bytes);
    }

    #[test]
    fn binary_round_trips_as_a_json_array() {
        let bytes = Bytes(vec![0xff, 0x00, b'a']);
        let json = serde_json::to_string(&bytes).unwrap();
        assert_eq!(json, "[255,0,97]");
        assert_eq!(serde_json::from_str::<Bytes>(&json).unwrap(), bytes);
    }

    #[test]
    fn display_distinguishes_text_from_binary() {
        assert_eq!(Bytes::from("a\"b").to_string(), "\"a\\\"b\"");
        assert_eq!(Bytes(vec![0xff, b'a']).to_string(), "b\"\\xffa\"");
    }

    #[test]
    fn out_of_range_numbers_are_refused() {
        assert!(serde_json::from_str::<Bytes>("[256]").is_err());
    }
}
