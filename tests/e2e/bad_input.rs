//! Bad input at every door: credentials, values, tokens, purposes, tampered
//! storage and malformed wire messages.
//!
//! Each case pins the exact gRPC code, a message that names the problem
//! without echoing any value, that nothing was stored or revealed, and the
//! audit events the refusal left behind.

use std::time::Duration;

use bytes::BufMut;
use ordervault::audit::{Action, AuditEvent, Decision};
use ordervault::kinds::FieldKind as VaultKind;
use ordervault::token::{Token as VaultToken, TokenClass};
use ordervault_proto::v1 as pb;
use ordervault_proto::v1::token_service_client::TokenServiceClient;
use ordervault_sdk::{Client, Error, FieldKind, Order};
use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::support::{Vault, sample_order};

/// A phone number used as the vault's stored secret in several tests, and
/// the forms of it that must never appear in an error message.
const PHONE: &str = "+86 139 4827 3615";
const PHONE_TRACES: [&str; 3] = ["13948273615", "139****3615", "4827"];

/// The one message every authentication failure gets, so that it tells a
/// prober nothing about which keys exist.
const AUTH_MESSAGE: &str = "missing, unknown or revoked API key";

/// A refusal as the caller saw it: the code (`None` if the SDK failed before
/// sending) and the message.
type Refusal = (Option<Code>, String);

fn sdk_refusal(e: Error) -> Refusal {
    (e.code(), e.to_string())
}

fn wire_refusal(s: Status) -> Refusal {
    (Some(s.code()), s.message().to_owned())
}

/// Asserts the exact code, that the message names the problem, and that it
/// carries none of `secrets`.
fn assert_refused<T>(
    case: &str,
    got: Result<T, Refusal>,
    code: Code,
    names: &str,
    secrets: &[String],
) {
    let Err((got_code, message)) = got else {
        panic!("{case}: the request succeeded; expected {code:?} naming {names:?}");
    };
    assert_eq!(
        got_code,
        Some(code),
        "{case}: wrong code; message: {message}"
    );
    assert!(
        message.contains(names),
        "{case}: message {message:?} does not name the problem ({names:?})"
    );
    for secret in secrets {
        let secret = secret.trim();
        if !secret.is_empty() {
            assert!(
                !message.contains(secret),
                "{case}: message {message:?} carries a value ({secret:?})"
            );
        }
    }
}

/// The (action, decision, reason) of each event, for exact comparisons.
type Summary = (Action, Decision, Option<String>);

fn summarise(events: &[AuditEvent]) -> Vec<Summary> {
    events
        .iter()
        .map(|e| (e.action, e.decision, e.reason.clone()))
        .collect()
}

fn expect(action: Action, decision: Decision, reason: &str) -> Summary {
    (action, decision, Some(reason.to_owned()))
}

async fn events_since(vault: &Vault, seen: usize) -> Vec<AuditEvent> {
    vault.audit().await.split_off(seen)
}

/// Fails if any of `events` disclosed a value or stored one.
fn assert_nothing_allowed(case: &str, events: &[AuditEvent]) {
    for e in events {
        assert!(
            !matches!(e.decision, Decision::Allowed | Decision::Masked),
            "{case}: an event allowed something: {e:?}"
        );
    }
}

/// A channel to the vault for raw gRPC calls.
async fn channel(vault: &Vault) -> Channel {
    Endpoint::from_shared(vault.url())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// The generated client, for requests the SDK cannot express.
async fn raw_client(vault: &Vault) -> TokenServiceClient<Channel> {
    TokenServiceClient::new(channel(vault).await).max_encoding_message_size(usize::MAX)
}

/// `message` with an `authorization` entry of exactly `header`.
fn with_header<T>(message: T, header: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", header.parse().unwrap());
    request
}

fn with_key<T>(message: T, key: &str) -> tonic::Request<T> {
    with_header(message, &format!("Bearer {key}"))
}

fn phone_token() -> String {
    VaultToken::generate(TokenClass::Field(VaultKind::Phone)).to_string()
}

/// The row id of a token: its 16-byte body.
/// The key the token's row is stored under.
fn row_id(vault: &Vault, token: &str) -> Vec<u8> {
    let key = vault.engine.storage_key(&VaultToken::parse(token).unwrap());
    assert_ne!(
        &key,
        VaultToken::parse(token).unwrap().id(),
        "new vaults store tokens under a key other than the token's body"
    );
    key.to_vec()
}

// ---------------------------------------------------------------------------
// Authentication
// ---------------------------------------------------------------------------

enum AuthRequest {
    /// Tokenize through the SDK with this key, or with none.
    Tokenize(Option<String>),
    /// Reveal through the SDK with this key.
    Reveal(String),
    /// Tokenize with this raw `authorization` header value.
    Header(String),
}

struct AuthCase {
    name: &'static str,
    request: AuthRequest,
    /// What must not appear in the reply or the audit log.
    key: Option<String>,
    reason: &'static str,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_callers_are_refused_and_audited() {
    let vault = Vault::start().await;
    let shop = vault.client("shop").await;
    let token = shop
        .tokenize([(FieldKind::Phone, PHONE)])
        .await
        .unwrap()
        .remove(0);
    let courier = vault.client("courier").await;
    let before = courier.reveal([&token]).purpose("delivery").await.unwrap();
    assert_eq!(
        before[0].denial_reason(),
        Some("no_grant"),
        "the key works; the bare token needs a grant"
    );

    let changed = vault
        .sql()
        .execute(
            "UPDATE principals SET revoked_ms = 1 WHERE name = 'courier'",
            [],
        )
        .unwrap();
    assert_eq!(changed, 1);
    vault.engine.reload_principals().await.unwrap();

    let unknown: String = "abcdefghijklmnopqrstuvwxyz234567".repeat(2)[..52].to_owned();
    let unknown = format!("ovk_{unknown}");
    let cases = vec![
        AuthCase {
            name: "no API key",
            request: AuthRequest::Tokenize(None),
            key: None,
            reason: "missing_api_key",
        },
        AuthCase {
            name: "a key that is not a bearer token",
            request: AuthRequest::Header(format!("Basic {}", vault.key("shop"))),
            key: Some(vault.key("shop")),
            reason: "missing_api_key",
        },
        AuthCase {
            name: "a well-formed unknown key",
            request: AuthRequest::Tokenize(Some(unknown.clone())),
            key: Some(unknown),
            reason: "unknown_api_key",
        },
        AuthCase {
            name: "a garbage key",
            request: AuthRequest::Tokenize(Some("garbage-Key_123".into())),
            key: Some("garbage-Key_123".into()),
            reason: "unknown_api_key",
        },
        AuthCase {
            name: "a revoked key",
            request: AuthRequest::Reveal(vault.key("courier")),
            key: Some(vault.key("courier")),
            reason: "revoked_api_key",
        },
    ];

    for case in cases {
        let name = case.name;
        let tokens = vault.token_count().await;
        let seen = vault.audit().await.len();
        let got = match case.request {
            AuthRequest::Tokenize(key) => {
                let client = Client::connect(vault.url()).await.unwrap();
                let client = match key {
                    Some(key) => client.api_key(key),
                    None => client,
                };
                client
                    .tokenize([(FieldKind::Phone, "+86 139 1234 0000")])
                    .await
                    .map(drop)
                    .map_err(sdk_refusal)
            }
            AuthRequest::Reveal(key) => Client::connect(vault.url())
                .await
                .unwrap()
                .api_key(key)
                .reveal([&token])
                .purpose("delivery")
                .await
                .map(drop)
                .map_err(sdk_refusal),
            AuthRequest::Header(header) => {
                let request = pb::TokenizeRequest {
                    fields: vec![pb::Field {
                        kind: pb::FieldKind::Phone as i32,
                        value: "+86 139 1234 0000".into(),
                    }],
                };
                raw_client(&vault)
                    .await
                    .tokenize(with_header(request, &header))
                    .await
                    .map(drop)
                    .map_err(wire_refusal)
            }
        };
        let mut secrets: Vec<String> = case.key.iter().cloned().collect();
        secrets.extend(["13912340000".to_owned(), PHONE_TRACES[0].to_owned()]);
        assert_refused(name, got, Code::Unauthenticated, AUTH_MESSAGE, &secrets);
        assert_eq!(
            vault.token_count().await,
            tokens,
            "{name}: a token was stored"
        );

        // The failure is audited without holding up the reply: wait for the
        // event to land (bounded), then check it is the only one.
        let mut events = Vec::new();
        for _ in 0..200 {
            events = events_since(&vault, seen).await;
            if !events.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            summarise(&events),
            vec![expect(Action::AuthFailed, Decision::Denied, case.reason)],
            "{name}"
        );
        let event = &events[0];
        assert_eq!(event.principal, "", "{name}");
        let peer = event.peer.as_deref().unwrap_or_default();
        assert!(peer.starts_with("127.0.0.1"), "{name}: peer {peer:?}");
        if let Some(key) = &case.key {
            let printed = format!("{event:?}");
            assert!(!printed.contains(key.as_str()), "{name}: key in audit log");
        }
    }
    vault.stop().await;
}

// ---------------------------------------------------------------------------
// Tokenize
// ---------------------------------------------------------------------------

enum TokenizeInput {
    /// Through the SDK.
    Fields(Vec<(FieldKind, String)>),
    /// Through the generated client: kinds the SDK cannot send.
    Wire(Vec<(i32, String)>),
    /// `TokenizeOrder` through the SDK.
    Order(Box<Order>),
    /// `TokenizeOrder` through the generated client.
    WireOrder(Option<Box<pb::Order>>),
}

impl TokenizeInput {
    /// Every value the request carries.
    fn values(&self) -> Vec<String> {
        match self {
            TokenizeInput::Fields(f) => f.iter().map(|(_, v)| v.clone()).collect(),
            TokenizeInput::Wire(f) => f.iter().map(|(_, v)| v.clone()).collect(),
            TokenizeInput::Order(o) => {
                let c = &o.consignee;
                let mut values = vec![
                    o.order_number.clone(),
                    c.name.clone(),
                    c.phone.clone(),
                    c.address.clone(),
                ];
                values.extend(o.customer_id.iter().cloned());
                values.extend(c.id_number.iter().cloned());
                values.extend(c.email.iter().cloned());
                for item in &o.items {
                    values.extend([item.title.clone(), item.unit_price.clone()]);
                }
                values
            }
            TokenizeInput::WireOrder(o) => o
                .iter()
                .flat_map(|o| {
                    let mut values = vec![o.order_number.clone(), o.customer_id.clone()];
                    for item in &o.items {
                        values.extend([item.title.clone(), item.unit_price.clone()]);
                    }
                    values
                })
                .collect(),
        }
    }
}

struct TokenizeCase {
    name: &'static str,
    role: &'static str,
    request: TokenizeInput,
    code: Code,
    names: &'static str,
    /// The exact audit events left behind; `None` where validation refuses
    /// the request before any decision (then only "nothing was allowed").
    audit: Option<Vec<Summary>>,
}

fn fields(kind: FieldKind, values: &[&str]) -> TokenizeInput {
    TokenizeInput::Fields(values.iter().map(|v| (kind, (*v).to_owned())).collect())
}

fn invalid(name: &'static str, request: TokenizeInput, names: &'static str) -> TokenizeCase {
    TokenizeCase {
        name,
        role: "shop",
        request,
        code: Code::InvalidArgument,
        names,
        audit: None,
    }
}

async fn send_tokenize(vault: &Vault, role: &str, request: TokenizeInput) -> Result<(), Refusal> {
    match request {
        TokenizeInput::Fields(f) => {
            let client = vault.client(role).await;
            client.tokenize(f).await.map(drop).map_err(sdk_refusal)
        }
        TokenizeInput::Order(o) => {
            let client = vault.client(role).await;
            client
                .tokenize_order(&o)
                .await
                .map(drop)
                .map_err(sdk_refusal)
        }
        TokenizeInput::Wire(f) => {
            let request = pb::TokenizeRequest {
                fields: f
                    .into_iter()
                    .map(|(kind, value)| pb::Field { kind, value })
                    .collect(),
            };
            raw_client(vault)
                .await
                .tokenize(with_key(request, &vault.key(role)))
                .await
                .map(drop)
                .map_err(wire_refusal)
        }
        TokenizeInput::WireOrder(order) => raw_client(vault)
            .await
            .tokenize_order(with_key(
                pb::TokenizeOrderRequest {
                    order: order.map(|o| *o),
                },
                &vault.key(role),
            ))
            .await
            .map(drop)
            .map_err(wire_refusal),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_values_are_refused_and_nothing_is_stored() {
    let vault = Vault::start().await;

    let too_long = format!("{}xx", "路".repeat(1365));
    assert_eq!(too_long.len(), 4097);
    let many: Vec<String> = (0..1001).map(|i| format!("蓝牙耳机 {i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let mut no_phone = sample_order(7);
    no_phone.consignee.phone = String::new();
    let no_consignee = pb::Order {
        order_number: "SO2026112200777".into(),
        customer_id: "cust-000777".into(),
        consignee: None,
        items: vec![pb::LineItem {
            sku: "SKU-EAR-PRO".into(),
            title: "无线蓝牙耳机 Pro".into(),
            quantity: 1,
            unit_price: "199.00".into(),
            currency: "CNY".into(),
        }],
        placed_at: None,
    };

    let cases = vec![
        invalid(
            "empty value",
            fields(FieldKind::Name, &[""]),
            "field #0 (name) is empty",
        ),
        invalid(
            "whitespace-only value",
            fields(FieldKind::Name, &[" \t\u{3000} "]),
            "field #0 (name) is empty",
        ),
        invalid(
            "value of 4097 bytes",
            fields(FieldKind::Address, &[&too_long]),
            "field #0 (address) is 4097 bytes, over the limit of 4096 bytes",
        ),
        invalid(
            "1001 fields",
            fields(FieldKind::OrderDetails, &many),
            "1001 fields in one request; the limit is 1000",
        ),
        invalid(
            "unknown field kind",
            TokenizeInput::Wire(vec![(99, "张小明".into())]),
            "field #0: unknown field kind 99",
        ),
        invalid(
            "missing field kind",
            TokenizeInput::Wire(vec![
                (pb::FieldKind::Name as i32, "李四".into()),
                (0, "13800138000".into()),
            ]),
            "field #1: field kind is missing",
        ),
        invalid(
            "malformed phone",
            fields(FieldKind::Phone, &["call me maybe"]),
            "field #0 (phone) is not a valid phone",
        ),
        invalid(
            "three good fields and one bad",
            TokenizeInput::Fields(vec![
                (FieldKind::Name, "李四".into()),
                (FieldKind::Phone, "+86 138 0013 8000".into()),
                (FieldKind::Phone, "ring 138 0013".into()),
                (FieldKind::Address, "上海市浦东新区世纪大道100号".into()),
            ]),
            "field #2 (phone) is not a valid phone",
        ),
        invalid(
            "name with NUL",
            fields(FieldKind::Name, &["王\u{0}五"]),
            "field #0 (name) contains a control or invisible formatting character (U+0000)",
        ),
        invalid(
            "name with a control character",
            fields(FieldKind::Name, &["王\u{7}五"]),
            "field #0 (name) contains a control or invisible formatting character (U+0007)",
        ),
        invalid(
            "name with a bidi override",
            fields(FieldKind::Name, &["Ali\u{202E}ecnO"]),
            "field #0 (name) contains a control or invisible formatting character (U+202E)",
        ),
        invalid(
            "name with a zero-width space",
            fields(FieldKind::Name, &["Ali\u{200B}Baba"]),
            "field #0 (name) contains a control or invisible formatting character (U+200B)",
        ),
        TokenizeCase {
            name: "role without the tokenize permission",
            role: "courier",
            request: fields(FieldKind::Phone, &["+86 138 0013 8000"]),
            code: Code::PermissionDenied,
            names: "role \"courier\" may not tokenize",
            audit: Some(vec![expect(
                Action::Tokenize,
                Decision::Denied,
                "tokenize_not_allowed",
            )]),
        },
        invalid(
            "order without a consignee",
            TokenizeInput::WireOrder(Some(Box::new(no_consignee))),
            "order.consignee is missing",
        ),
        invalid(
            "order whose consignee phone is empty",
            TokenizeInput::Order(Box::new(no_phone)),
            "order.consignee.phone (phone) is empty",
        ),
        invalid(
            "TokenizeOrder without an order",
            TokenizeInput::WireOrder(None),
            "order is missing",
        ),
    ];

    for case in cases {
        let name = case.name;
        let tokens = vault.token_count().await;
        let seen = vault.audit().await.len();
        let secrets = case.request.values();
        let got = send_tokenize(&vault, case.role, case.request).await;
        assert_refused(name, got, case.code, case.names, &secrets);
        assert_eq!(
            vault.token_count().await,
            tokens,
            "{name}: something was stored"
        );
        let events = events_since(&vault, seen).await;
        assert_nothing_allowed(name, &events);
        if let Some(audit) = case.audit {
            assert_eq!(summarise(&events), audit, "{name}");
            assert_eq!(events[0].principal, case.role, "{name}");
            assert_eq!(events[0].count, Some(1), "{name}");
        }
    }

    // Letters of any script and combining marks are names, not bad input.
    let shop = vault.client("shop").await;
    for name in ["阿卜杜拉·买买提", "José Núñez"] {
        let tokens = vault.token_count().await;
        let seen = vault.audit().await.len();
        let token = shop.tokenize([(FieldKind::Name, name)]).await;
        let token = token.unwrap_or_else(|e| panic!("{name:?} was refused: {e}"));
        assert!(token[0].as_str().starts_with("nm_"), "{name:?}");
        assert_eq!(vault.token_count().await, tokens + 1, "{name:?}");
        let events = events_since(&vault, seen).await;
        assert_eq!(
            summarise(&events),
            vec![(Action::Tokenize, Decision::Allowed, None)],
            "{name:?}"
        );
    }
    vault.stop().await;
}

// ---------------------------------------------------------------------------
// Reveal
// ---------------------------------------------------------------------------

struct RevealCase {
    name: &'static str,
    tokens: Vec<String>,
    purpose: &'static str,
    code: Code,
    names: &'static str,
    /// The exact events, one per requested token; `None` where the request
    /// is refused before any decision.
    audit: Option<Vec<Summary>>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_reveals_are_refused_and_reveal_nothing() {
    let vault = Vault::start().await;
    let shop = vault.client("shop").await;
    let phone = shop
        .tokenize([(FieldKind::Phone, PHONE)])
        .await
        .unwrap()
        .remove(0)
        .into_string();
    let order = shop.tokenize_order(&sample_order(3)).await.unwrap();
    let order_token = order.order_token.as_str().to_owned();
    let as_name = format!("nm_{}", &phone[3..]);
    let unknown = phone_token();
    let many: Vec<String> = (0..1001).map(|_| phone_token()).collect();

    let malformed = |name, tokens: Vec<String>, names| RevealCase {
        name,
        tokens,
        purpose: "delivery",
        code: Code::InvalidArgument,
        names,
        audit: None,
    };
    let cases = vec![
        malformed(
            "not a token",
            vec!["not-a-token".into()],
            "token #0 is not an ordervault token",
        ),
        malformed(
            "body too short",
            vec!["ph_tooshort".into()],
            "token #0 is not an ordervault token",
        ),
        malformed(
            "uppercase token",
            vec![phone.to_uppercase()],
            "token #0 is not an ordervault token",
        ),
        RevealCase {
            name: "prefix of another kind",
            tokens: vec![as_name.clone()],
            purpose: "delivery",
            code: Code::InvalidArgument,
            names: "token #0 does not match the kind its prefix names",
            audit: Some(vec![expect(
                Action::Reveal,
                Decision::Denied,
                "kind_mismatch",
            )]),
        },
        RevealCase {
            name: "unknown token",
            tokens: vec![unknown.clone()],
            purpose: "delivery",
            code: Code::NotFound,
            names: "token #0 is not held by this vault",
            audit: Some(vec![expect(
                Action::Reveal,
                Decision::Denied,
                "unknown_token",
            )]),
        },
        RevealCase {
            name: "missing purpose",
            purpose: "",
            names: "purpose is required",
            ..malformed("", vec![phone.clone()], "")
        },
        RevealCase {
            name: "malformed purpose",
            purpose: "Not Valid",
            names: "purpose is not a valid purpose name",
            ..malformed("", vec![phone.clone()], "")
        },
        RevealCase {
            name: "purpose of another role",
            tokens: vec![phone.clone()],
            purpose: "customer_support",
            code: Code::PermissionDenied,
            names: "role \"courier\" may not reveal for purpose \"customer_support\"; its purposes are: delivery",
            audit: Some(vec![expect(
                Action::Reveal,
                Decision::Denied,
                "purpose_not_allowed",
            )]),
        },
        RevealCase {
            name: "purpose not in the policy",
            tokens: vec![phone.clone()],
            purpose: "shopping_spree",
            code: Code::PermissionDenied,
            names: "(no such purpose in the policy); its purposes are: delivery",
            audit: Some(vec![expect(
                Action::Reveal,
                Decision::Denied,
                "purpose_not_allowed",
            )]),
        },
        malformed(
            "order token",
            vec![order_token.clone()],
            "token #0 is an order token",
        ),
        malformed(
            "1001 tokens",
            many,
            "1001 tokens in one request; the limit is 1000",
        ),
    ];

    let courier = vault.client("courier").await;
    let mut secrets: Vec<String> = PHONE_TRACES.iter().map(|s| (*s).to_owned()).collect();
    secrets.extend([phone.clone(), order_token.clone(), "张小明".into()]);
    for case in cases {
        let name = case.name;
        let tokens = vault.token_count().await;
        let seen = vault.audit().await.len();
        let got = courier
            .reveal(&case.tokens)
            .purpose(case.purpose)
            .await
            .map_err(sdk_refusal);
        let mut secrets = secrets.clone();
        if case.tokens.len() == 1 {
            secrets.push(case.tokens[0].clone());
        }
        assert_refused(name, got, case.code, case.names, &secrets);
        assert_eq!(vault.token_count().await, tokens, "{name}");
        let events = events_since(&vault, seen).await;
        assert_nothing_allowed(name, &events);
        if let Some(audit) = case.audit {
            assert_eq!(summarise(&events), audit, "{name}");
            for (event, token) in events.iter().zip(&case.tokens) {
                assert_eq!(event.principal, "courier", "{name}");
                assert_eq!(event.token.as_ref(), Some(token), "{name}");
                assert_eq!(event.purpose.as_deref(), Some(case.purpose), "{name}");
            }
        }
    }

    // A kind the role may not see is a per-field denial, not an error.
    let seen = vault.audit().await.len();
    let supplier = vault.client("supplier").await;
    let revealed = supplier
        .reveal([&phone])
        .purpose("fulfilment")
        .await
        .unwrap();
    assert_eq!(revealed.len(), 1);
    assert_eq!(revealed[0].token.as_str(), phone);
    assert_eq!(revealed[0].denial_reason(), Some("kind_not_allowed"));
    assert_eq!(revealed[0].plain(), None);
    assert_eq!(revealed[0].masked(), None);
    let events = events_since(&vault, seen).await;
    assert_eq!(
        summarise(&events),
        vec![expect(Action::Reveal, Decision::Denied, "kind_not_allowed")]
    );
    assert_eq!(events[0].principal, "supplier");
    assert_eq!(events[0].token.as_deref(), Some(phone.as_str()));

    // The same token is fine for the shop: the refusals above were about
    // the requests, not the stored value.
    let revealed = shop
        .reveal([&phone])
        .purpose("order_management")
        .await
        .unwrap();
    assert_eq!(revealed[0].masked(), Some("139****3615"));
    vault.stop().await;
}

// ---------------------------------------------------------------------------
// Tampered storage
// ---------------------------------------------------------------------------

fn ciphertext(vault: &Vault, token: &str) -> (Vec<u8>, i64) {
    vault
        .sql()
        .query_row(
            "SELECT ciphertext, key_version FROM tokens WHERE id = ?1",
            [row_id(vault, token)],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
}

fn overwrite(vault: &Vault, token: &str, ciphertext: &[u8], key_version: i64) {
    let changed = vault
        .sql()
        .execute(
            "UPDATE tokens SET ciphertext = ?2, key_version = ?3 WHERE id = ?1",
            rusqlite::params![row_id(vault, token), ciphertext, key_version],
        )
        .unwrap();
    assert_eq!(changed, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_ciphertexts_are_data_loss_and_reveal_nothing() {
    let vault = Vault::start().await;
    let shop = vault.client("shop").await;
    let values = [
        "+86 139 4827 3615",
        "+86 137 5190 6248",
        "+86 136 7702 9431",
        "+86 135 8864 1057",
    ];
    let tokens: Vec<String> = shop
        .tokenize(values.map(|v| (FieldKind::Phone, v)))
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.into_string())
        .collect();
    let [flipped, source, swapped, good] = [0, 1, 2, 3].map(|i| tokens[i].clone());

    // The shop sees phones masked, which needs decrypting them.
    let courier = vault.client("shop").await;
    let before = courier
        .reveal(&tokens)
        .purpose("order_management")
        .await
        .unwrap();
    assert!(before.iter().all(|r| r.masked().is_some()));

    // One bit in the middle of the ciphertext.
    let (mut bytes, version) = ciphertext(&vault, &flipped);
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    overwrite(&vault, &flipped, &bytes, version);
    // Another token's valid ciphertext and key version: the associated data
    // binds each ciphertext to its own token.
    let (bytes, version) = ciphertext(&vault, &source);
    overwrite(&vault, &swapped, &bytes, version);

    let cases: [(&str, Vec<String>, Vec<&String>); 3] = [
        ("one flipped bit", vec![flipped.clone()], vec![&flipped]),
        (
            "another token's ciphertext",
            vec![swapped.clone()],
            vec![&swapped],
        ),
        (
            "a good token with a tampered one",
            vec![good.clone(), flipped.clone()],
            vec![&flipped],
        ),
    ];
    let mut secrets: Vec<String> = values.iter().map(|v| v.replace(' ', "")).collect();
    secrets.extend(values.iter().map(|v| v[4..].replace(' ', "")));
    secrets.extend(tokens.iter().cloned());
    for (name, request, corrupt) in cases {
        let count = vault.token_count().await;
        let seen = vault.audit().await.len();
        let got = courier
            .reveal(&request)
            .purpose("order_management")
            .await
            .map_err(sdk_refusal);
        assert_refused(
            name,
            got,
            Code::DataLoss,
            "failed their integrity check; nothing was revealed",
            &secrets,
        );
        assert_eq!(vault.token_count().await, count, "{name}");
        let events = events_since(&vault, seen).await;
        assert_eq!(
            summarise(&events),
            vec![expect(Action::Reveal, Decision::Error, "integrity_check_failed"); corrupt.len()],
            "{name}"
        );
        for (event, token) in events.iter().zip(corrupt) {
            assert_eq!(event.token.as_ref(), Some(token), "{name}");
            assert_eq!(event.principal, "shop", "{name}");
        }
    }

    // Untouched rows still reveal.
    let after = courier
        .reveal([&good, &source])
        .purpose("order_management")
        .await
        .unwrap();
    assert_eq!(after[0].masked(), Some("135****1057"));
    assert_eq!(after[1].masked(), Some("137****6248"));
    vault.stop().await;
}

// ---------------------------------------------------------------------------
// Malformed wire messages
// ---------------------------------------------------------------------------

/// Sends a request body as given, byte for byte, and decodes a
/// `TokenizeResponse`.
#[derive(Debug, Clone, Copy, Default)]
struct RawBody;

#[derive(Debug)]
struct RawEncoder;

#[derive(Debug)]
struct ResponseDecoder;

impl Codec for RawBody {
    type Encode = Vec<u8>;
    type Decode = pb::TokenizeResponse;
    type Encoder = RawEncoder;
    type Decoder = ResponseDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> ResponseDecoder {
        ResponseDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for ResponseDecoder {
    type Item = pb::TokenizeResponse;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        pb::TokenizeResponse::decode(src)
            .map(Some)
            .map_err(|e| Status::internal(format!("test client: bad response: {e}")))
    }
}

async fn send_raw(vault: &Vault, body: Vec<u8>) -> Result<pb::TokenizeResponse, Refusal> {
    let mut grpc = tonic::client::Grpc::new(channel(vault).await);
    grpc.ready().await.unwrap();
    let path = PathAndQuery::from_static("/ordervault.v1.TokenService/Tokenize");
    grpc.unary(with_key(body, &vault.key("shop")), path, RawBody)
        .await
        .map(tonic::Response::into_inner)
        .map_err(wire_refusal)
}

/// A `TokenizeRequest` of one `Field { kind, value }`, encoded by hand so the
/// value can be any bytes.
fn hand_encoded(kind: u8, value: &[u8]) -> Vec<u8> {
    let value_len = u8::try_from(value.len()).unwrap();
    let mut field = vec![0x08, kind, 0x12, value_len];
    field.extend_from_slice(value);
    let mut request = vec![0x0a, u8::try_from(field.len()).unwrap()];
    request.extend(field);
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_are_client_errors() {
    let vault = Vault::start().await;

    // The hand encoding and the raw client work: a well-formed body passes.
    let reply = send_raw(&vault, hand_encoded(2, b"13812345678")).await;
    let reply = reply.unwrap_or_else(|(code, message)| panic!("{code:?}: {message}"));
    assert_eq!(reply.tokens.len(), 1);
    assert!(reply.tokens[0].starts_with("ph_"));

    let big = "机密".repeat(192_240);
    assert!(big.len() > 1_100_000);
    let oversized = pb::TokenizeRequest {
        fields: (0..5)
            .map(|_| pb::Field {
                kind: pb::FieldKind::OrderDetails as i32,
                value: big.clone(),
            })
            .collect(),
    };
    assert!(oversized.encoded_len() > 5 * 1024 * 1024);

    let cases: Vec<(&str, Vec<u8>, Code, &str)> = vec![
        (
            "body that is not protobuf",
            vec![0xff, 0xff, 0xff, 0xff, 0x0f],
            Code::InvalidArgument,
            "request is not a valid ordervault.v1 protobuf message",
        ),
        (
            "string field holding invalid UTF-8",
            hand_encoded(2, &[0xff, 0xfe, 0x41]),
            Code::InvalidArgument,
            "request is not a valid ordervault.v1 protobuf message",
        ),
        (
            "truncated message",
            vec![0x0a, 0x10, 0x08, 0x02],
            Code::InvalidArgument,
            "request is not a valid ordervault.v1 protobuf message",
        ),
        (
            "message over 4 MiB",
            oversized.encode_to_vec(),
            Code::ResourceExhausted,
            "over the limit of 4194304 bytes",
        ),
    ];
    let secrets = vec!["机密".to_owned(), "\u{FFFD}".to_owned()];
    for (name, body, code, names) in cases {
        let tokens = vault.token_count().await;
        let seen = vault.audit().await.len();
        let got = send_raw(&vault, body).await;
        assert_refused(name, got, code, names, &secrets);
        assert_eq!(vault.token_count().await, tokens, "{name}");
        assert_nothing_allowed(name, &events_since(&vault, seen).await);
    }

    // The generated client, once told to send it, gets the same answer.
    let tokens = vault.token_count().await;
    let got = raw_client(&vault)
        .await
        .tokenize(with_key(oversized, &vault.key("shop")))
        .await
        .map_err(wire_refusal);
    assert_refused(
        "message over 4 MiB, generated client",
        got,
        Code::ResourceExhausted,
        "over the limit of 4194304 bytes",
        &secrets,
    );
    assert_eq!(vault.token_count().await, tokens);
    vault.stop().await;
}
