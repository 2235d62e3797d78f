//! Turning tokens back into what a role may see: the [`Reveal`] request and
//! its per-token outcome, [`Revealed`].

use std::fmt;
use std::future::{Future, IntoFuture};
use std::pin::Pin;

use ordervault_proto::v1 as pb;
use secrecy::{ExposeSecret, SecretString};

use crate::{Client, Error, FieldKind, Token};

/// A reveal request being built; await it to send it.
///
/// Made by [`Client::reveal`]. Every reveal needs a [`purpose`](Reveal::purpose);
/// one without is sent with an empty purpose, which the vault rejects with
/// [`Error::InvalidArgument`].
///
/// ```no_run
/// # async fn f(courier: ordervault_sdk::Client, tokens: Vec<ordervault_sdk::Token>)
/// # -> Result<(), ordervault_sdk::Error> {
/// let fields = courier.reveal(&tokens).purpose("delivery").await?;
/// # Ok(()) }
/// ```
#[must_use = "a reveal is sent only when it is awaited"]
#[derive(Debug, Clone)]
pub struct Reveal {
    client: Client,
    tokens: Vec<String>,
    purpose: String,
}

impl Reveal {
    pub(crate) fn new(client: Client, tokens: Vec<String>) -> Self {
        Reveal {
            client,
            tokens,
            purpose: String::new(),
        }
    }

    /// Why the values are needed: `"delivery"`, `"fulfilment"`,
    /// `"customer_support"`, ... It must be one of the purposes of the
    /// caller's role, and it is written to the audit log with every outcome.
    pub fn purpose(self, purpose: impl Into<String>) -> Reveal {
        Reveal {
            purpose: purpose.into(),
            ..self
        }
    }
}

impl IntoFuture for Reveal {
    type Output = Result<Vec<Revealed>, Error>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move { self.client.send_reveal(self.tokens, self.purpose).await })
    }
}

/// What one token revealed: the value, its mask, or why nothing.
#[derive(Debug, Clone)]
pub struct Revealed {
    /// The token this outcome is for.
    pub token: Token,
    /// The kind of the token's value; `None` if the vault did not say or
    /// names a kind this SDK does not know.
    pub kind: Option<FieldKind>,
    /// What the caller may see.
    pub disclosure: Disclosure,
}

impl Revealed {
    /// The plain value, if the policy disclosed it in full.
    ///
    /// This exposes the secret: use it where the value is needed (a
    /// shipping label), and do not log or keep it.
    pub fn plain(&self) -> Option<&str> {
        match &self.disclosure {
            Disclosure::Plain(value) => Some(value.expose_secret()),
            _ => None,
        }
    }

    /// The masked display form, such as `138****5678`, if the policy
    /// disclosed only that.
    pub fn masked(&self) -> Option<&str> {
        match &self.disclosure {
            Disclosure::Masked(mask) => Some(mask),
            _ => None,
        }
    }

    /// The vault's machine-readable reason, such as `"kind_not_allowed"`, if
    /// nothing was disclosed.
    pub fn denial_reason(&self) -> Option<&str> {
        match &self.disclosure {
            Disclosure::Denied { reason } => Some(reason),
            _ => None,
        }
    }
}

/// How much of a value the vault disclosed.
///
/// `Debug` prints neither a plain value nor a mask (a mask still shows part
/// of the value), only the denial reason.
#[derive(Clone)]
pub enum Disclosure {
    /// The value in full, as the vault stores it (normalised). Wiped from
    /// memory when dropped.
    Plain(SecretString),
    /// The display mask of the value, such as `138****5678`.
    Masked(String),
    /// Nothing is disclosed.
    Denied {
        /// Machine-readable reason, such as `"kind_not_allowed"`.
        reason: String,
    },
}

impl Disclosure {
    /// Whether the vault disclosed nothing.
    pub fn is_denied(&self) -> bool {
        matches!(self, Disclosure::Denied { .. })
    }
}

impl fmt::Debug for Disclosure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Disclosure::Plain(_) => f.write_str("Plain([redacted])"),
            Disclosure::Masked(_) => f.write_str("Masked([redacted])"),
            Disclosure::Denied { reason } => {
                f.debug_struct("Denied").field("reason", reason).finish()
            }
        }
    }
}

/// Interprets a `Reveal` reply to a request for `requested` tokens.
///
/// The proto promises one entry per requested token, in request order.
/// Callers zip the result with their own tokens, so a reply that breaks the
/// promise is a [`Error::Protocol`] rather than a silent mismatch.
pub(crate) fn revealed_from_reply(
    requested: &[String],
    reply: pb::RevealResponse,
) -> Result<Vec<Revealed>, Error> {
    if reply.fields.len() != requested.len() {
        return Err(Error::Protocol(format!(
            "{} tokens were requested but the reply has {} entries",
            requested.len(),
            reply.fields.len()
        )));
    }
    reply
        .fields
        .into_iter()
        .zip(requested)
        .enumerate()
        .map(|(i, (field, requested))| {
            if field.token != *requested {
                return Err(Error::Protocol(format!(
                    "entry {i} of the reply is for a different token than requested"
                )));
            }
            // The plain value moves into a SecretString without a copy when
            // prost allocated it exactly; the decode buffers inside tonic and
            // prost are beyond the SDK's reach and are not wiped.
            let disclosure = match pb::Disclosure::try_from(field.disclosure) {
                Ok(pb::Disclosure::Plain) => Disclosure::Plain(SecretString::from(field.value)),
                Ok(pb::Disclosure::Masked) => Disclosure::Masked(field.value),
                Ok(pb::Disclosure::Denied) => Disclosure::Denied {
                    reason: field.denial_reason,
                },
                Ok(pb::Disclosure::Unspecified) | Err(_) => {
                    return Err(Error::Protocol(format!(
                        "entry {i} of the reply has disclosure {}, which this SDK does not know",
                        field.disclosure
                    )));
                }
            };
            Ok(Revealed {
                token: Token::from(field.token),
                kind: FieldKind::from_wire(field.kind),
                disclosure,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(
        token: &str,
        kind: i32,
        disclosure: pb::Disclosure,
        value: &str,
        reason: &str,
    ) -> pb::RevealedField {
        pb::RevealedField {
            token: token.into(),
            kind,
            disclosure: disclosure as i32,
            value: value.into(),
            denial_reason: reason.into(),
        }
    }

    fn requested() -> Vec<String> {
        ["ph_1", "nm_1", "id_1", "xx_1"].map(String::from).to_vec()
    }

    fn reply() -> pb::RevealResponse {
        pb::RevealResponse {
            fields: vec![
                field(
                    "ph_1",
                    pb::FieldKind::Phone as i32,
                    pb::Disclosure::Plain,
                    "+8613812345678",
                    "",
                ),
                field(
                    "nm_1",
                    pb::FieldKind::Name as i32,
                    pb::Disclosure::Masked,
                    "张*明",
                    "",
                ),
                field(
                    "id_1",
                    pb::FieldKind::IdNumber as i32,
                    pb::Disclosure::Denied,
                    "",
                    "kind_not_allowed",
                ),
                field("xx_1", 42, pb::Disclosure::Denied, "", "kind_not_allowed"),
            ],
        }
    }

    #[test]
    fn reply_converts_each_outcome() {
        let revealed = revealed_from_reply(&requested(), reply()).expect("a well-formed reply");
        assert_eq!(revealed.len(), 4);

        assert_eq!(revealed[0].token.as_str(), "ph_1");
        assert_eq!(revealed[0].kind, Some(FieldKind::Phone));
        assert_eq!(revealed[0].plain(), Some("+8613812345678"));
        assert_eq!(revealed[0].masked(), None);
        assert_eq!(revealed[0].denial_reason(), None);
        assert!(!revealed[0].disclosure.is_denied());

        assert_eq!(revealed[1].kind, Some(FieldKind::Name));
        assert_eq!(revealed[1].masked(), Some("张*明"));
        assert_eq!(revealed[1].plain(), None);

        assert_eq!(revealed[2].kind, Some(FieldKind::IdNumber));
        assert_eq!(revealed[2].denial_reason(), Some("kind_not_allowed"));
        assert!(revealed[2].disclosure.is_denied());
        assert_eq!(revealed[2].plain(), None);

        // A kind from a newer vault is not an error, just unknown here.
        assert_eq!(revealed[3].kind, None);
    }

    #[test]
    fn debug_of_revealed_never_prints_a_value() {
        let revealed = revealed_from_reply(&requested(), reply()).expect("a well-formed reply");
        let printed = format!("{revealed:?} {revealed:#?}");
        for value in ["13812345678", "5678", "张"] {
            assert!(!printed.contains(value), "{value} leaked into {printed}");
        }
        assert_eq!(format!("{:?}", revealed[0].disclosure), "Plain([redacted])");
        assert_eq!(
            format!("{:?}", revealed[1].disclosure),
            "Masked([redacted])"
        );
        assert_eq!(
            format!("{:?}", revealed[2].disclosure),
            "Denied { reason: \"kind_not_allowed\" }"
        );
        assert_eq!(
            format!("{:?}", revealed[0]),
            "Revealed { token: Token(\"ph_1\"), kind: Some(Phone), disclosure: Plain([redacted]) }"
        );
    }

    #[test]
    fn entry_count_mismatch_is_a_protocol_error() {
        let mut short = reply();
        short.fields.pop();
        let error = revealed_from_reply(&requested(), short).err();
        assert_eq!(
            error,
            Some(Error::Protocol(
                "4 tokens were requested but the reply has 3 entries".into()
            ))
        );
    }

    #[test]
    fn reordered_reply_is_a_protocol_error() {
        let mut swapped = reply();
        swapped.fields.swap(0, 1);
        let error = revealed_from_reply(&requested(), swapped).err();
        assert_eq!(
            error,
            Some(Error::Protocol(
                "entry 0 of the reply is for a different token than requested".into()
            ))
        );
    }

    #[test]
    fn unknown_disclosure_is_a_protocol_error_and_leaks_nothing() {
        let mut odd = reply();
        odd.fields[0].disclosure = 0;
        let error = revealed_from_reply(&requested(), odd).err();
        assert_eq!(
            error,
            Some(Error::Protocol(
                "entry 0 of the reply has disclosure 0, which this SDK does not know".into()
            ))
        );
        let mut newer = reply();
        newer.fields[1].disclosure = 7;
        let error = revealed_from_reply(&requested(), newer).err();
        assert!(
            matches!(&error, Some(Error::Protocol(m)) if !m.contains("张")),
            "{error:?}"
        );
    }
}
