//! Tokens: what downstream systems keep instead of values.
//!
//! A token is `<prefix>_<26 base32 chars>`: the prefix names the field kind
//! (`ph` phone, `nm` name, ..., `ot` for an order token) and the body is 128
//! bits that look random to anyone without the vault's keys (see
//! [`TokenIds`]). Nothing about the value is in the token, and because every
//! token contains letters and an underscore it can never be mistaken for a
//! real phone number, ID number or email address.

use std::fmt;
use std::sync::{Arc, LazyLock};

use data_encoding::{Encoding, Specification};

use crate::crypto::{self, BlockPermutation};
use crate::kinds::FieldKind;

/// Length of the body in bytes (128 bits).
pub const TOKEN_ID_BYTES: usize = 16;
const BODY_CHARS: usize = 26;
const ORDER_PREFIX: &str = "ot";

/// RFC 4648 base32 in lowercase without padding. Non-zero trailing bits are
/// refused, so every body has exactly one spelling.
static BASE32_LOWER: LazyLock<Encoding> = LazyLock::new(|| {
    let mut spec = Specification::new();
    spec.symbols.push_str("abcdefghijklmnopqrstuvwxyz234567");
    spec.check_trailing_bits = true;
    spec.encoding().expect("a valid base32 specification")
});

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
        if body.len() != BODY_CHARS {
            return Err(TokenError::Malformed);
        }
        let mut id = [0u8; TOKEN_ID_BYTES];
        // Refuses other symbols (upper case included) and set trailing bits.
        BASE32_LOWER
            .decode_mut(body.as_bytes(), &mut id)
            .map_err(|_| TokenError::Malformed)?;
        Ok(Token {
            class: class_of_prefix(prefix)?,
            id,
        })
    }

    /// Whether `text` is the canonical spelling of a token with body `id`
    /// (cheaper than parsing `text`: one encoding into a buffer, no
    /// decoding).
    pub fn spells(text: &str, id: &[u8; TOKEN_ID_BYTES]) -> bool {
        let Some((prefix, body)) = text.split_once('_') else {
            return false;
        };
        if body.len() != BODY_CHARS || class_of_prefix(prefix).is_err() {
            return false;
        }
        let mut expected = [0u8; BODY_CHARS];
        BASE32_LOWER.encode_mut(id, &mut expected);
        body.as_bytes() == expected
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

    /// The body, as 16 bytes (see [`TokenIds`] for how it maps to the
    /// storage key).
    pub fn id(&self) -> &[u8; TOKEN_ID_BYTES] {
        &self.id
    }
}

/// How token bodies relate to the keys rows are stored under.
///
/// Random 128-bit storage keys scatter every insert over the whole B-tree:
/// each new token dirties its own page of every index it is in. Time-ordered
/// keys make inserts appends, but a token must not tell when it was made
/// (the time of purchase is part of what scammers recite). So the storage key
/// is `creation time || 96 random bits` and the token body is that key under a
/// keyed permutation (AES-256 on one block), derived from the fingerprint
/// root: the body is indistinguishable from random without the key, and
/// holds 96 random bits even to someone who has it.
#[derive(Clone, Debug)]
pub enum TokenIds {
    /// Vaults created before time-ordered storage: the body is 128 random
    /// bits and is the storage key.
    Random,
    /// Body = permutation(storage key); storage key = creation time in
    /// milliseconds (low 32 bits, big-endian: it wraps every 49.7 days, which
    /// moves the insertion point but never makes two keys equal) followed by
    /// 96 random bits.
    TimeOrdered(Arc<BlockPermutation>),
}

/// The value of the `token_ids` metadata entry of a vault whose storage keys
/// are time-ordered; vaults without the entry use [`TokenIds::Random`].
pub const TIME_ORDERED_V1: &[u8] = b"time-ordered-v1";

impl TokenIds {
    /// A new token body, for a token made at `now_ms`.
    pub fn mint(&self, now_ms: i64) -> [u8; TOKEN_ID_BYTES] {
        let mut id = crypto::random_bytes::<TOKEN_ID_BYTES>();
        match self {
            TokenIds::Random => id,
            TokenIds::TimeOrdered(p) => {
                // Truncation intended: the key only needs local order.
                id[..4].copy_from_slice(&(now_ms as u32).to_be_bytes());
                p.forward(&id)
            }
        }
    }

    /// The storage key of a token body.
    pub fn storage_key(&self, body: &[u8; TOKEN_ID_BYTES]) -> [u8; TOKEN_ID_BYTES] {
        match self {
            TokenIds::Random => *body,
            TokenIds::TimeOrdered(p) => p.backward(body),
        }
    }

    /// The token body of a storage key.
    pub fn body(&self, storage_key: &[u8; TOKEN_ID_BYTES]) -> [u8; TOKEN_ID_BYTES] {
        match self {
            TokenIds::Random => *storage_key,
            TokenIds::TimeOrdered(p) => p.forward(storage_key),
        }
    }
}

fn class_of_prefix(prefix: &str) -> Result<TokenClass, TokenError> {
    if prefix == ORDER_PREFIX {
        Ok(TokenClass::Order)
    } else {
        FieldKind::from_token_prefix(prefix)
            .map(TokenClass::Field)
            .ok_or(TokenError::UnknownPrefix)
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let prefix = match self.class {
            TokenClass::Field(k) => k.token_prefix(),
            TokenClass::Order => ORDER_PREFIX,
        };
        let mut body = [0u8; BODY_CHARS];
        BASE32_LOWER.encode_mut(&self.id, &mut body);
        let body = std::str::from_utf8(&body).map_err(|_| fmt::Error)?;
        write!(f, "{prefix}_{body}")
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

    fn time_ordered() -> TokenIds {
        TokenIds::TimeOrdered(Arc::new(BlockPermutation::new(
            &crate::crypto::SecretKey::generate(),
        )))
    }

    #[test]
    fn spells_agrees_with_parse() {
        let t = Token::generate(TokenClass::Field(FieldKind::Phone));
        let o = Token::generate(TokenClass::Order);
        let text = t.to_string();
        assert!(Token::spells(&text, t.id()));
        assert!(Token::spells(&o.to_string(), o.id()));
        assert!(!Token::spells(&text, o.id()), "another body");
        // Same body, another class; not a token; upper case (not canonical).
        let as_order = Token::from_parts(TokenClass::Order, *t.id()).to_string();
        assert_ne!(as_order, text);
        assert!(Token::spells(&as_order, t.id()));
        for bad in [
            "",
            "ph",
            "zz_aaaa",
            &text.to_uppercase(),
            &format!("{text}a"),
        ] {
            assert!(!Token::spells(bad, t.id()), "{bad:?}");
            assert!(Token::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn time_ordered_storage_keys_sort_by_creation_and_bodies_do_not() {
        let ids = time_ordered();
        let bodies: Vec<_> = (0..200)
            .map(|i| ids.mint(1_795_000_000_000 + i * 7))
            .collect();
        let keys: Vec<_> = bodies.iter().map(|b| ids.storage_key(b)).collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "keys follow creation");
        let ascending = bodies.windows(2).filter(|w| w[0] < w[1]).count();
        assert!(
            (40..160).contains(&ascending),
            "bodies are in no order: {ascending}/199 ascending"
        );
        for (b, k) in bodies.iter().zip(&keys) {
            assert_eq!(&ids.body(k), b);
        }
        // 96 random bits follow the time: equal times still give distinct keys.
        let (a, b) = (ids.mint(5), ids.mint(5));
        assert_ne!(a, b);
        assert_eq!(ids.storage_key(&a)[..4], ids.storage_key(&b)[..4]);
        assert_ne!(ids.storage_key(&a)[4..], ids.storage_key(&b)[4..]);
    }

    #[test]
    fn another_key_maps_the_same_body_elsewhere_and_random_ids_are_the_identity() {
        let (one, two) = (time_ordered(), time_ordered());
        let body = one.mint(1_000);
        assert_ne!(one.storage_key(&body), two.storage_key(&body));
        let random = TokenIds::Random;
        let body = random.mint(1_000);
        assert_eq!(random.storage_key(&body), body);
        assert_eq!(random.body(&body), body);
        assert_ne!(random.mint(1_000)[..4], random.mint(1_000)[..4]);
    }

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
