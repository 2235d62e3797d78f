//! Orders as the shop knows them ([`Order`]) and as everyone downstream
//! should keep them ([`TokenizedOrder`]).

use std::fmt;
use std::time::SystemTime;

use ordervault_proto::v1 as pb;

use crate::{Error, Token};

/// Stands in for a value in `Debug` output.
struct Redacted;

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// `Some([redacted])` or `None`: whether an optional value is there, not what
/// it is.
fn redacted_if_some<T>(value: &Option<T>) -> Option<Redacted> {
    value.as_ref().map(|_| Redacted)
}

/// An order as the shop's backend holds it at checkout, before tokenizing.
///
/// `Debug` never prints a value, only SKUs, quantities and currencies.
///
/// The vault limits each value to 4096 bytes of UTF-8.
#[derive(Clone, Default)]
pub struct Order {
    /// The shop's order number. Required.
    pub order_number: String,
    /// The shop's identifier of the customer (the data subject).
    pub customer_id: Option<String>,
    /// Who receives the parcel, and where.
    pub consignee: Consignee,
    /// What was bought.
    pub items: Vec<LineItem>,
    /// When the order was placed; tokenized as order details.
    pub placed_at: Option<SystemTime>,
}

impl fmt::Debug for Order {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Order")
            .field("order_number", &Redacted)
            .field("customer_id", &redacted_if_some(&self.customer_id))
            .field("consignee", &self.consignee)
            .field("items", &self.items)
            .field("placed_at", &redacted_if_some(&self.placed_at))
            .finish()
    }
}

/// Who receives an order, and where. Name, phone and address are required.
///
/// `Debug` never prints a value.
#[derive(Clone, Default)]
pub struct Consignee {
    /// The recipient's name.
    pub name: String,
    /// The recipient's phone number.
    pub phone: String,
    /// The delivery address.
    pub address: String,
    /// Resident ID or passport number, for customs or age checks.
    pub id_number: Option<String>,
    /// The recipient's e-mail address.
    pub email: Option<String>,
}

impl fmt::Debug for Consignee {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consignee")
            .field("name", &Redacted)
            .field("phone", &Redacted)
            .field("address", &Redacted)
            .field("id_number", &redacted_if_some(&self.id_number))
            .field("email", &redacted_if_some(&self.email))
            .finish()
    }
}

/// One line of an order.
///
/// SKU, quantity and currency are catalogue facts and pass through the vault
/// unchanged; title and price say what a person bought and are tokenized as
/// order details. `Debug` prints only the former.
#[derive(Clone, Default)]
pub struct LineItem {
    /// Catalogue code; passes through as-is.
    pub sku: String,
    /// Product title; tokenized.
    pub title: String,
    /// Number of units; passes through as-is.
    pub quantity: u32,
    /// Decimal string such as `"199.00"`; tokenized.
    pub unit_price: String,
    /// ISO 4217 code such as `"CNY"`; passes through as-is.
    pub currency: String,
}

impl fmt::Debug for LineItem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LineItem")
            .field("sku", &self.sku)
            .field("title", &Redacted)
            .field("quantity", &self.quantity)
            .field("unit_price", &Redacted)
            .field("currency", &self.currency)
            .finish()
    }
}

/// An order after tokenizing: what the shop stores and hands downstream.
///
/// Holds no values, so it derives `Debug`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedOrder {
    /// The handle of the order as a whole, used for grants. It stands for no
    /// value of its own.
    pub order_token: Token,
    /// Token of the order number.
    pub order_number: Token,
    /// Token of the customer id; `None` when the order had none.
    pub customer_id: Option<Token>,
    /// Tokens of the consignee's data.
    pub consignee: TokenizedConsignee,
    /// The line items, in order.
    pub items: Vec<TokenizedLineItem>,
    /// Token of the purchase time; `None` when the order had none.
    pub placed_at: Option<Token>,
}

/// The consignee of a [`TokenizedOrder`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedConsignee {
    /// Token of the name.
    pub name: Token,
    /// Token of the phone number.
    pub phone: Token,
    /// Token of the address.
    pub address: Token,
    /// Token of the ID number; `None` when the order had none.
    pub id_number: Option<Token>,
    /// Token of the e-mail address; `None` when the order had none.
    pub email: Option<Token>,
}

/// A line item of a [`TokenizedOrder`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedLineItem {
    /// Catalogue code, as given.
    pub sku: String,
    /// Token of the title.
    pub title: Token,
    /// Number of units, as given.
    pub quantity: u32,
    /// Token of the unit price.
    pub unit_price: Token,
    /// ISO 4217 currency code, as given.
    pub currency: String,
}

impl TokenizedOrder {
    /// Every field token of the order, in the order of the fields (order
    /// number, customer id, consignee, each item's title and price, purchase
    /// time), without the order token, which stands for no value.
    ///
    /// Handy for revealing a whole order; each role then sees what its
    /// policy allows.
    pub fn all_tokens(&self) -> Vec<Token> {
        let consignee = &self.consignee;
        let mut tokens = Vec::with_capacity(6 + 2 * self.items.len());
        tokens.push(self.order_number.clone());
        tokens.extend(self.customer_id.clone());
        tokens.push(consignee.name.clone());
        tokens.push(consignee.phone.clone());
        tokens.push(consignee.address.clone());
        tokens.extend(consignee.id_number.clone());
        tokens.extend(consignee.email.clone());
        for item in &self.items {
            tokens.push(item.title.clone());
            tokens.push(item.unit_price.clone());
        }
        tokens.extend(self.placed_at.clone());
        tokens
    }
}

/// The request message for an order. An absent optional value is sent as
/// the empty string, as the proto defines.
pub(crate) fn order_to_wire(order: &Order) -> pb::Order {
    let consignee = &order.consignee;
    pb::Order {
        order_number: order.order_number.clone(),
        customer_id: order.customer_id.clone().unwrap_or_default(),
        consignee: Some(pb::Consignee {
            name: consignee.name.clone(),
            phone: consignee.phone.clone(),
            address: consignee.address.clone(),
            id_number: consignee.id_number.clone().unwrap_or_default(),
            email: consignee.email.clone().unwrap_or_default(),
        }),
        items: order
            .items
            .iter()
            .map(|item| pb::LineItem {
                sku: item.sku.clone(),
                title: item.title.clone(),
                quantity: item.quantity,
                unit_price: item.unit_price.clone(),
                currency: item.currency.clone(),
            })
            .collect(),
        placed_at: order.placed_at.map(prost_types::Timestamp::from),
    }
}

/// Interprets a `TokenizeOrder` reply to an order with `items_sent` line
/// items. Empty optional tokens become `None`; a missing required token or a
/// different number of items is a [`Error::Protocol`].
pub(crate) fn tokenized_order_from_reply(
    items_sent: usize,
    reply: pb::TokenizeOrderResponse,
) -> Result<TokenizedOrder, Error> {
    let order = reply
        .order
        .ok_or_else(|| Error::Protocol("the reply has no tokenized order".into()))?;
    let consignee = order
        .consignee
        .ok_or_else(|| Error::Protocol("the tokenized order has no consignee".into()))?;
    if order.items.len() != items_sent {
        return Err(Error::Protocol(format!(
            "the order had {items_sent} line items but the reply has {}",
            order.items.len()
        )));
    }
    let items = order
        .items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            Ok(TokenizedLineItem {
                sku: item.sku,
                title: required(item.title, || format!("items[{i}].title"))?,
                quantity: item.quantity,
                unit_price: required(item.unit_price, || format!("items[{i}].unit_price"))?,
                currency: item.currency,
            })
        })
        .collect::<Result<_, Error>>()?;
    Ok(TokenizedOrder {
        order_token: required(order.order_token, || "order_token".into())?,
        order_number: required(order.order_number, || "order_number".into())?,
        customer_id: optional(order.customer_id),
        consignee: TokenizedConsignee {
            name: required(consignee.name, || "consignee.name".into())?,
            phone: required(consignee.phone, || "consignee.phone".into())?,
            address: required(consignee.address, || "consignee.address".into())?,
            id_number: optional(consignee.id_number),
            email: optional(consignee.email),
        },
        items,
        placed_at: optional(order.placed_at),
    })
}

fn required(token: String, field: impl FnOnce() -> String) -> Result<Token, Error> {
    if token.is_empty() {
        Err(Error::Protocol(format!(
            "the reply has no token for {}",
            field()
        )))
    } else {
        Ok(Token::from(token))
    }
}

/// The proto marks an absent optional token with the empty string.
fn optional(token: String) -> Option<Token> {
    (!token.is_empty()).then(|| Token::from(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order() -> Order {
        Order {
            order_number: "SO-20240611-0001".into(),
            customer_id: Some("C-100042".into()),
            consignee: Consignee {
                name: "张小明".into(),
                phone: "+86 138 1234 5678".into(),
                address: "浙江省杭州市西湖区文三路123号".into(),
                id_number: Some("11010519491231002X".into()),
                email: Some("zxm@example.com".into()),
            },
            items: vec![LineItem {
                sku: "SKU-EAR-PRO".into(),
                title: "无线蓝牙耳机".into(),
                quantity: 2,
                unit_price: "199.00".into(),
                currency: "CNY".into(),
            }],
            placed_at: Some(SystemTime::UNIX_EPOCH),
        }
    }

    const VALUES: [&str; 8] = [
        "SO-20240611-0001",
        "C-100042",
        "张小明",
        "1234",
        "文三路",
        "11010519491231002X",
        "zxm@",
        "199.00",
    ];

    #[test]
    fn debug_of_order_never_prints_a_value() {
        let order = order();
        for printed in [
            format!("{order:?}"),
            format!("{order:#?}"),
            format!("{:?}", order.consignee),
            format!("{:?}", order.items[0]),
        ] {
            for value in VALUES.iter().chain(&["无线蓝牙耳机", "tv_sec"]) {
                assert!(!printed.contains(value), "{value} leaked into {printed}");
            }
        }
        assert_eq!(
            format!("{:?}", order.items[0]),
            "LineItem { sku: \"SKU-EAR-PRO\", title: [redacted], quantity: 2, \
             unit_price: [redacted], currency: \"CNY\" }"
        );
        assert_eq!(
            format!("{:?}", order.consignee),
            "Consignee { name: [redacted], phone: [redacted], address: [redacted], \
             id_number: Some([redacted]), email: Some([redacted]) }"
        );
    }

    #[test]
    fn absent_optionals_are_sent_empty() {
        let mut order = order();
        order.customer_id = None;
        order.consignee.id_number = None;
        order.placed_at = None;
        let wire = order_to_wire(&order);
        assert_eq!(wire.customer_id, "");
        assert_eq!(wire.placed_at, None);
        let consignee = wire.consignee.unwrap_or_default();
        assert_eq!(consignee.id_number, "");
        assert_eq!(consignee.email, "zxm@example.com");
        assert_eq!(wire.items[0].quantity, 2);
    }

    #[test]
    fn placed_at_is_sent_as_a_timestamp() {
        let mut order = order();
        order.placed_at =
            Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_718_000_000));
        let wire = order_to_wire(&order);
        assert_eq!(
            wire.placed_at,
            Some(prost_types::Timestamp {
                seconds: 1_718_000_000,
                nanos: 0
            })
        );
    }

    fn reply(
        customer_id: &str,
        id_number: &str,
        email: &str,
        placed_at: &str,
    ) -> pb::TokenizeOrderResponse {
        pb::TokenizeOrderResponse {
            order: Some(pb::TokenizedOrder {
                order_token: "ord_1".into(),
                order_number: "on_1".into(),
                customer_id: customer_id.into(),
                consignee: Some(pb::TokenizedConsignee {
                    name: "nm_1".into(),
                    phone: "ph_1".into(),
                    address: "ad_1".into(),
                    id_number: id_number.into(),
                    email: email.into(),
                }),
                items: vec![pb::TokenizedLineItem {
                    sku: "SKU-EAR-PRO".into(),
                    title: "od_1".into(),
                    quantity: 2,
                    unit_price: "od_2".into(),
                    currency: "CNY".into(),
                }],
                placed_at: placed_at.into(),
            }),
        }
    }

    fn token(s: &str) -> Token {
        Token::from(s.to_owned())
    }

    #[test]
    fn empty_optional_tokens_become_none() {
        let order = tokenized_order_from_reply(1, reply("", "", "", ""));
        let order = order.expect("a reply with all required tokens is valid");
        assert_eq!(order.customer_id, None);
        assert_eq!(order.consignee.id_number, None);
        assert_eq!(order.consignee.email, None);
        assert_eq!(order.placed_at, None);
        assert_eq!(
            order.all_tokens(),
            ["on_1", "nm_1", "ph_1", "ad_1", "od_1", "od_2"].map(token)
        );
    }

    #[test]
    fn full_reply_converts_field_by_field() {
        let order = tokenized_order_from_reply(1, reply("ci_1", "id_1", "em_1", "od_3"))
            .expect("a complete reply is valid");
        assert_eq!(
            order,
            TokenizedOrder {
                order_token: token("ord_1"),
                order_number: token("on_1"),
                customer_id: Some(token("ci_1")),
                consignee: TokenizedConsignee {
                    name: token("nm_1"),
                    phone: token("ph_1"),
                    address: token("ad_1"),
                    id_number: Some(token("id_1")),
                    email: Some(token("em_1")),
                },
                items: vec![TokenizedLineItem {
                    sku: "SKU-EAR-PRO".into(),
                    title: token("od_1"),
                    quantity: 2,
                    unit_price: token("od_2"),
                    currency: "CNY".into(),
                }],
                placed_at: Some(token("od_3")),
            }
        );
        // Every field token once, never the order token.
        assert_eq!(
            order.all_tokens(),
            [
                "on_1", "ci_1", "nm_1", "ph_1", "ad_1", "id_1", "em_1", "od_1", "od_2", "od_3"
            ]
            .map(token)
        );
    }

    #[test]
    fn missing_required_token_is_a_protocol_error() {
        let mut r = reply("", "", "", "");
        if let Some(c) = r.order.as_mut().and_then(|o| o.consignee.as_mut()) {
            c.phone.clear();
        }
        assert_eq!(
            tokenized_order_from_reply(1, r),
            Err(Error::Protocol(
                "the reply has no token for consignee.phone".into()
            ))
        );

        let mut r = reply("", "", "", "");
        if let Some(o) = r.order.as_mut() {
            o.items[0].unit_price.clear();
        }
        assert_eq!(
            tokenized_order_from_reply(1, r),
            Err(Error::Protocol(
                "the reply has no token for items[0].unit_price".into()
            ))
        );

        let mut r = reply("", "", "", "");
        if let Some(o) = r.order.as_mut() {
            o.order_token.clear();
        }
        assert_eq!(
            tokenized_order_from_reply(1, r),
            Err(Error::Protocol(
                "the reply has no token for order_token".into()
            ))
        );
    }

    #[test]
    fn item_count_mismatch_is_a_protocol_error() {
        assert_eq!(
            tokenized_order_from_reply(2, reply("", "", "", "")),
            Err(Error::Protocol(
                "the order had 2 line items but the reply has 1".into()
            ))
        );
    }

    #[test]
    fn missing_order_or_consignee_is_a_protocol_error() {
        let none = pb::TokenizeOrderResponse { order: None };
        assert!(matches!(
            tokenized_order_from_reply(0, none),
            Err(Error::Protocol(_))
        ));
        let mut r = reply("", "", "", "");
        if let Some(o) = r.order.as_mut() {
            o.consignee = None;
        }
        assert_eq!(
            tokenized_order_from_reply(1, r),
            Err(Error::Protocol(
                "the tokenized order has no consignee".into()
            ))
        );
    }
}
