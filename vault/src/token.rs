//! Tokens: what downstream systems keep instead of values.
//!
//! A token is `<prefix>_<26 base32 chars>`: the prefix names the field kind
//! (`ph` phone, `nm` name, ..., `ot` for an order token) and the body is 128
//! random bits from a CSPRNG. Nothing about the value is in the token, and
//! because every token contains letters and an underscore it can never be
//! mistaken for a real phone number, ID number or email address.

use std::fmt;

use data_encoding::BASE32_NOPAD;

use crate::crypto;
use crate::kinds::FieldKind;

/// Length of the random body in bytes (128 bits).
pub const TOKEN_ID_BYTES: usize = 16;
const BODY_CHARS: usize = 26;
const ORDER_PREFIX: &str = "ot";

/// What a token stands for: one field of a kind, or an order as a whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TokenClass {
    /// A field value of this kind.
    Field(FieldKind),
    /// An order; carries no value of its own.
    Order,
}

/// A parsed token.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Token {
    class: TokenClass,
    id: [u8; TOKEN_ID_BYTES],
}

/// Why a string is not a token. Never echoes the string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// The string does not have the `<prefix>_<body>` shape.
    #[error("is not an ordervault token (expected <kind prefix>_<26 base32 characters>)")]
    Malformed,
    /// The prefix names no field kind.
    #[error("has an unknown kind prefix")]
    UnknownPrefix,
}

impl Token {
    /// A fresh random token of `class`.
    pub fn generate(class: TokenClass) -> Token {
        Token {
            class,
            id: crypto::random_bytes::<TOKEN_ID_BYTES>(),
        }
    }

    /// Rebuilds a token from its stored parts.
    pub fn from_parts(class: TokenClass, id: [u8; TOKEN_ID_BYTES]) -> Token {
        Token { class, id }
    }

    /// Parses the canonical (lowercase) text form.
    pub fn parse(s: &str) -> Result<Token, TokenError> {
        let (prefix, body) = s.split_once('_').ok_or(TokenError::Malformed)?;
        if body.len() != BODY_CHARS
            || !body
                .bytes()
                .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b))
        {
            return Err(TokenError::Malformed);
        }
        let class = if prefix == ORDER_PREFIX {
            TokenClass::Order
        } else {
            TokenClass::Field(
                FieldKind::from_token_prefix(prefix).ok_or(TokenError::UnknownPrefix)?,
            )
        };
        let decoded = BASE32_NOPAD
            .decode(body.to_ascii_uppercase().as_bytes())
            .map_err(|_| TokenError::Malformed)?;
        let id: [u8; TOKEN_ID_BYTES] = decoded.try_into().map_err(|_| TokenError::Malformed)?;
        // Reject non-canonical encodings (trailing bits set) so that one id
        // has exactly one spelling.
        if Token::from_parts(class, id).to_string() != s {
            return Err(TokenError::Malformed);
        }
        Ok(Token { class, id })
    }

    /// The token's class.
    pub fn class(&self) -> TokenClass {
        self.class
    }

    /// The field kind, for field tokens.
    pub fn kind(&self) -> Option<FieldKind> {
        match self.class {
            TokenClass::Field(k) => Some(k),
            TokenClass::Order => None,
        }
    }

    /// The random body, the storage key.
    pub fn id(&self) -> &[u8; TOKEN_ID_BYTES] {
        &self.id
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let prefix = match self.class {
            TokenClass::Field(k) => k.token_prefix(),
            TokenClass::Order => ORDER_PREFIX,
        };
        write!(
            f,
            "{prefix}_{}",
            BASE32_NOPAD.encode(&self.id).to_ascii_lowercase()
        )
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_for_every_class() {
        let mut classes: Vec<TokenClass> = FieldKind::ALL
            .iter()
            .map(|k| TokenClass::Field(*k))
            .collect();
        classes.push(TokenClass::Order);
        for class in classes {
            let t = Token::generate(class);
            let s = t.to_string();
            assert_eq!(s.len(), 3 + BODY_CHARS);
            assert_eq!(Token::parse(&s), Ok(t));
        }
    }

    #[test]
    fn tokens_are_distinct_and_never_digit_only() {
        let a = Token::generate(TokenClass::Field(FieldKind::Phone)).to_string();
        let b = Token::generate(TokenClass::Field(FieldKind::Phone)).to_string();
        assert_ne!(a, b);
        assert!(a.starts_with("ph_"));
        assert!(!a.chars().all(|c| c.is_ascii_digit() || c == '+'));
    }

    #[test]
    fn rejects_malformed_tokens() {
        let good = Token::generate(TokenClass::Field(FieldKind::Name)).to_string();
        let cases = [
            String::new(),
            "nm_".into(),
            "13812345678".into(),
            good.to_uppercase(),
            format!("{good}a"),
            good[..good.len() - 1].to_string(),
            good.replace('_', "-"),
            format!("{}1", &good[..good.len() - 1]),
        ];
        for case in cases {
            assert_eq!(Token::parse(&case), Err(TokenError::Malformed), "{case:?}");
        }
        assert_eq!(
            Token::parse(&good.replacen("nm", "zz", 1)),
            Err(TokenError::UnknownPrefix)
        );
    }

    #[test]
    fn non_canonical_trailing_bits_are_rejected() {
        let good = Token::generate(TokenClass::Order).to_string();
        // The last base32 char carries 3 padding bits; a different char
        // that decodes to the same 16 bytes must not be accepted.
        let last = good.as_bytes()[good.len() - 1];
        for c in b"abcdefghijklmnopqrstuvwxyz234567" {
            if *c == last {
                continue;
            }
            let mut other = good.clone().into_bytes();
            *other.last_mut().expect("non-empty") = *c;
            let other = String::from_utf8(other).expect("ascii");
            if let Ok(t) = Token::parse(&other) {
                assert_eq!(t.to_string(), other);
            }
        }
    }
}
