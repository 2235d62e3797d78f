//! Typed async client for the ordervault privacy vault.
//!
//! A shop's backend tokenizes an order at checkout and keeps only the
//! tokens; everyone downstream (courier, supplier, customer service) passes
//! tokens around and asks the vault to reveal them for a stated purpose. The
//! vault answers per token with the plain value, a mask or a denial, as the
//! caller's role policy says, and audits every answer.
//!
//! ```no_run
//! use ordervault_sdk::{Client, Consignee, LineItem, Order};
//!
//! # async fn checkout() -> Result<(), ordervault_sdk::Error> {
//! let vault = Client::connect("http://127.0.0.1:7470").await?;
//!
//! // At checkout, the shop tokenizes the order and stores only the tokens.
//! let shop = vault.clone().api_key("ov_shop_...");
//! let order = Order {
//!     order_number: "SO-20240611-0001".into(),
//!     consignee: Consignee {
//!         name: "张小明".into(),
//!         phone: "+86 138 1234 5678".into(),
//!         address: "浙江省杭州市西湖区文三路123号".into(),
//!         ..Consignee::default()
//!     },
//!     items: vec![LineItem {
//!         sku: "SKU-EAR-PRO".into(),
//!         title: "无线蓝牙耳机".into(),
//!         quantity: 1,
//!         unit_price: "199.00".into(),
//!         currency: "CNY".into(),
//!     }],
//!     ..Order::default()
//! };
//! let tokenized = shop.tokenize_order(&order).await?;
//!
//! // The courier gets the tokens and reveals them to deliver the parcel.
//! let courier = vault.api_key("ov_courier_...");
//! for field in courier.reveal(tokenized.all_tokens()).purpose("delivery").await? {
//!     if let Some(_value) = field.plain() {
//!         // Print it on the shipping label; never log it.
//!     } else if let Some(mask) = field.masked() {
//!         println!("{} {}: {mask}", field.token, field.kind.map_or("?", |k| k.as_str()));
//!     } else if let Some(reason) = field.denial_reason() {
//!         println!("{}: denied ({reason})", field.token);
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! # Map
//!
//! * [`Client`] (`client.rs`): the connection, the API key, and the calls.
//! * [`FieldKind`], [`Token`] (`token.rs`): what a value is, and what is kept
//!   instead of it.
//! * [`Order`], [`TokenizedOrder`] (`order.rs`): an order before and after
//!   tokenizing.
//! * [`Reveal`], [`Revealed`], [`Disclosure`] (`reveal.rs`): a reveal request
//!   and its per-token outcome.
//! * [`Error`] (`error.rs`): the one error type; the one place a gRPC status
//!   becomes an error.
//!
//! # Secrets in memory
//!
//! The API key and revealed plain values are held in
//! [`secrecy::SecretString`] and wiped on drop. `Debug` of every type that
//! can hold a value prints `[redacted]` instead. What the SDK cannot wipe:
//! the values of an [`Order`] and of [`Client::tokenize`] inputs (plain
//! `String`s the caller owns, copied into the request message), and the
//! encode and decode buffers inside tonic, prost and hyper.

mod client;
mod error;
mod grant;
mod order;
mod reveal;
mod token;

pub use client::Client;
pub use error::Error;
pub use grant::Grant;
pub use order::{
    Consignee, LineItem, Order, TokenizedConsignee, TokenizedLineItem, TokenizedOrder,
};
pub use reveal::{Disclosure, Reveal, Revealed};
pub use token::{FieldKind, Token};

// Re-exported because they appear in the public API (`Disclosure::Plain`,
// `Client::from_channel`, `Error::Other`): callers name these types through
// the SDK and so always get the versions it was built with.
pub use secrecy;
pub use tonic;
