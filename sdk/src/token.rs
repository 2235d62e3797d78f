//! What a value is ([`FieldKind`]) and what downstream systems keep instead
//! of it ([`Token`]).

use std::fmt;

use ordervault_proto::v1 as pb;

/// The kind of a sensitive value. Each kind has its own normaliser, mask and
/// token format in the vault, and the role policy decides per kind whether a
/// role sees it plain, masked or not at all.
///
/// Non-exhaustive because the vault's list of kinds grows; a kind this SDK
/// does not know shows up as `None` in [`Revealed::kind`](crate::Revealed::kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FieldKind {
    /// A person's name.
    Name,
    /// A phone number.
    Phone,
    /// A postal address.
    Address,
    /// A resident ID or passport number.
    IdNumber,
    /// An e-mail address.
    Email,
    /// The shop's order number.
    OrderNumber,
    /// Items, prices and times of an order.
    OrderDetails,
    /// The shop's identifier of the customer (the data subject).
    CustomerId,
}

impl FieldKind {
    /// The kind's name as the vault's policy and audit log spell it:
    /// `"name"`, `"phone"`, `"address"`, `"id_number"`, `"email"`,
    /// `"order_number"`, `"order_details"`, `"customer_id"`.
    pub fn as_str(self) -> &'static str {
        match self {
            FieldKind::Name => "name",
            FieldKind::Phone => "phone",
            FieldKind::Address => "address",
            FieldKind::IdNumber => "id_number",
            FieldKind::Email => "email",
            FieldKind::OrderNumber => "order_number",
            FieldKind::OrderDetails => "order_details",
            FieldKind::CustomerId => "customer_id",
        }
    }

    /// The kind carried in a reply's `FieldKind` number; `None` for
    /// `FIELD_KIND_UNSPECIFIED` and numbers this SDK does not know.
    pub(crate) fn from_wire(number: i32) -> Option<Self> {
        match pb::FieldKind::try_from(number).ok()? {
            pb::FieldKind::Unspecified => None,
            pb::FieldKind::Name => Some(FieldKind::Name),
            pb::FieldKind::Phone => Some(FieldKind::Phone),
            pb::FieldKind::Address => Some(FieldKind::Address),
            pb::FieldKind::IdNumber => Some(FieldKind::IdNumber),
            pb::FieldKind::Email => Some(FieldKind::Email),
            pb::FieldKind::OrderNumber => Some(FieldKind::OrderNumber),
            pb::FieldKind::OrderDetails => Some(FieldKind::OrderDetails),
            pb::FieldKind::CustomerId => Some(FieldKind::CustomerId),
        }
    }

    /// The kind's number on the wire.
    pub(crate) fn to_wire(self) -> i32 {
        let kind = match self {
            FieldKind::Name => pb::FieldKind::Name,
            FieldKind::Phone => pb::FieldKind::Phone,
            FieldKind::Address => pb::FieldKind::Address,
            FieldKind::IdNumber => pb::FieldKind::IdNumber,
            FieldKind::Email => pb::FieldKind::Email,
            FieldKind::OrderNumber => pb::FieldKind::OrderNumber,
            FieldKind::OrderDetails => pb::FieldKind::OrderDetails,
            FieldKind::CustomerId => pb::FieldKind::CustomerId,
        };
        kind as i32
    }
}

impl fmt::Display for FieldKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What downstream systems store and pass around instead of a value.
///
/// A token reveals nothing about its value, so it is not a secret: it may be
/// logged, stored and compared freely. Only the vault can turn it back into
/// a value, for a caller whose role and purpose allow it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Token(String);

impl Token {
    /// The token as text, to store or send on.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The token's text, consuming it.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl From<String> for Token {
    fn from(token: String) -> Self {
        Token(token)
    }
}

impl From<Token> for String {
    fn from(token: Token) -> Self {
        token.0
    }
}

impl AsRef<str> for Token {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [FieldKind; 8] = [
        FieldKind::Name,
        FieldKind::Phone,
        FieldKind::Address,
        FieldKind::IdNumber,
        FieldKind::Email,
        FieldKind::OrderNumber,
        FieldKind::OrderDetails,
        FieldKind::CustomerId,
    ];

    #[test]
    fn kinds_round_trip_through_the_wire_number() {
        for kind in ALL {
            assert_eq!(FieldKind::from_wire(kind.to_wire()), Some(kind));
        }
    }

    #[test]
    fn kind_names_match_the_proto_enum() {
        for kind in ALL {
            let proto_name = pb::FieldKind::try_from(kind.to_wire())
                .map(|k| k.as_str_name())
                .unwrap_or_default();
            assert_eq!(
                proto_name,
                format!("FIELD_KIND_{}", kind.as_str().to_uppercase())
            );
            assert_eq!(kind.to_string(), kind.as_str());
        }
    }

    #[test]
    fn unspecified_and_unknown_kinds_are_none() {
        assert_eq!(FieldKind::from_wire(0), None);
        assert_eq!(FieldKind::from_wire(99), None);
        assert_eq!(FieldKind::from_wire(-1), None);
    }

    #[test]
    fn token_is_plain_text() {
        let token = Token::from("ph_3kq9".to_owned());
        assert_eq!(token.as_str(), "ph_3kq9");
        assert_eq!(token.to_string(), "ph_3kq9");
        assert_eq!(format!("{token:?}"), "Token(\"ph_3kq9\")");
        assert_eq!(String::from(token), "ph_3kq9");
    }
}
