//! The gRPC edge: proto messages → domain types → engine → reply.
//!
//! "Parse, don't validate": kinds, tokens and purposes become types here,
//! values are moved out of the request into wiped buffers, and
//! [`status`] is the one place where a [`VaultError`] becomes a wire code.
//! (Copies of values inside hyper's and prost's buffers are beyond reach of
//! zeroizing; the README says so.)

use std::sync::Arc;

use ordervault_proto::v1;
use ordervault_proto::v1::token_service_server::TokenService;
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use crate::engine::{Disclosure, Engine, FieldInput, ItemInput, OrderInput, Principal};
use crate::error::VaultError;
use crate::kinds::FieldKind;
use crate::token::Token;

/// Maps a domain error to its gRPC status. The only such mapping.
pub fn status(e: VaultError) -> Status {
    match e {
        VaultError::InvalidArgument(m) => Status::invalid_argument(m),
        VaultError::Unauthenticated(m) => Status::unauthenticated(m),
        VaultError::PermissionDenied(m) => Status::permission_denied(m),
        VaultError::NotFound(m) => Status::not_found(m),
        VaultError::AlreadyExists(m) => Status::already_exists(m),
        VaultError::ResourceExhausted(m) => Status::resource_exhausted(m),
        VaultError::RateLimited {
            message,
            retry_after_ms,
        } => {
            let mut st = Status::resource_exhausted(message);
            let secs = retry_after_ms.div_ceil(1000).max(1);
            if let Ok(v) = secs.to_string().parse() {
                st.metadata_mut().insert("retry-after", v);
            }
            st
        }
        VaultError::FailedPrecondition(m) => Status::failed_precondition(m),
        VaultError::DataLoss(m) => Status::data_loss(m),
        VaultError::Unavailable(m) => Status::unavailable(m),
        VaultError::Internal(m) => Status::internal(m),
    }
}

/// Authenticates a request from its `authorization: Bearer <key>` entry.
pub fn authenticate<T>(engine: &Engine, req: &Request<T>) -> Result<Principal, Status> {
    let presented = req
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let peer = req.remote_addr().map(|a| a.ip());
    engine.authenticate(presented, peer).map_err(status)
}

fn parse_kind(label: &str, raw: i32) -> Result<FieldKind, VaultError> {
    match u8::try_from(raw).ok().and_then(FieldKind::from_code) {
        Some(k) => Ok(k),
        None if raw == 0 => Err(VaultError::InvalidArgument(format!(
            "{label}: field kind is missing"
        ))),
        None => Err(VaultError::InvalidArgument(format!(
            "{label}: unknown field kind {raw}; known kinds are name, phone, address, id_number, email, order_number, order_details, customer_id"
        ))),
    }
}

fn take(value: &mut String) -> Zeroizing<String> {
    Zeroizing::new(std::mem::take(value))
}

fn input(kind: FieldKind, label: String, value: &mut String) -> FieldInput {
    FieldInput {
        kind,
        value: take(value),
        label,
    }
}

fn optional(kind: FieldKind, label: &str, value: &mut String) -> Option<FieldInput> {
    (!value.is_empty()).then(|| input(kind, label.to_owned(), value))
}

/// RFC 3339 (UTC, seconds) from a protobuf timestamp.
fn rfc3339(ts: &prost_types::Timestamp) -> Result<String, VaultError> {
    let bad = || VaultError::InvalidArgument("order.placed_at is not a valid timestamp".into());
    let secs = u64::try_from(ts.seconds).map_err(|_| bad())?;
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
    Ok(humantime::format_rfc3339_seconds(time).to_string())
}

fn order_input(order: Option<v1::Order>) -> Result<OrderInput, VaultError> {
    let mut o = order.ok_or_else(|| VaultError::InvalidArgument("order is missing".into()))?;
    let mut c = o
        .consignee
        .take()
        .ok_or_else(|| VaultError::InvalidArgument("order.consignee is missing".into()))?;
    let mut items = Vec::with_capacity(o.items.len());
    for (i, mut item) in o.items.into_iter().enumerate() {
        items.push(ItemInput {
            sku: item.sku,
            title: input(
                FieldKind::OrderDetails,
                format!("order.items[{i}].title"),
                &mut item.title,
            ),
            quantity: item.quantity,
            unit_price: input(
                FieldKind::OrderDetails,
                format!("order.items[{i}].unit_price"),
                &mut item.unit_price,
            ),
            currency: item.currency,
        });
    }
    let placed_at = match &o.placed_at {
        Some(ts) => Some(FieldInput {
            kind: FieldKind::OrderDetails,
            value: Zeroizing::new(rfc3339(ts)?),
            label: "order.placed_at".into(),
        }),
        None => None,
    };
    Ok(OrderInput {
        order_number: input(
            FieldKind::OrderNumber,
            "order.order_number".into(),
            &mut o.order_number,
        ),
        customer_id: optional(
            FieldKind::CustomerId,
            "order.customer_id",
            &mut o.customer_id,
        ),
        name: input(FieldKind::Name, "order.consignee.name".into(), &mut c.name),
        phone: input(
            FieldKind::Phone,
            "order.consignee.phone".into(),
            &mut c.phone,
        ),
        address: input(
            FieldKind::Address,
            "order.consignee.address".into(),
            &mut c.address,
        ),
        id_number: optional(
            FieldKind::IdNumber,
            "order.consignee.id_number",
            &mut c.id_number,
        ),
        email: optional(FieldKind::Email, "order.consignee.email", &mut c.email),
        items,
        placed_at,
    })
}

/// A protobuf timestamp from Unix milliseconds.
pub fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

fn grant_info(g: &crate::store::GrantRecord) -> v1::GrantInfo {
    v1::GrantInfo {
        grant_id: crate::engine::grant_id_string(&g.id),
        principal: g.principal.clone(),
        order_token: Token::from_parts(crate::token::TokenClass::Order, g.order_id).to_string(),
        purpose: g.purpose.clone(),
        expires_at: Some(timestamp(g.expires_ms)),
        granted_by: g.granted_by.clone(),
        created_at: Some(timestamp(g.created_ms)),
        revoked_at: g.revoked_ms.map(timestamp),
    }
}

fn opt(t: &Option<Token>) -> String {
    t.map(|t| t.to_string()).unwrap_or_default()
}

/// `TokenService`.
#[derive(Debug, Clone)]
pub struct TokenApi {
    engine: Arc<Engine>,
}

impl TokenApi {
    /// Serves `engine`.
    pub fn new(engine: Arc<Engine>) -> TokenApi {
        TokenApi { engine }
    }
}

#[tonic::async_trait]
impl TokenService for TokenApi {
    async fn tokenize(
        &self,
        req: Request<v1::TokenizeRequest>,
    ) -> Result<Response<v1::TokenizeResponse>, Status> {
        let principal = authenticate(&self.engine, &req)?;
        let mut fields = Vec::new();
        for (i, mut f) in req.into_inner().fields.into_iter().enumerate() {
            let label = format!("field #{i}");
            let kind = parse_kind(&label, f.kind).map_err(status)?;
            fields.push(input(kind, label, &mut f.value));
        }
        let tokens = self
            .engine
            .tokenize(&principal, fields)
            .await
            .map_err(status)?;
        Ok(Response::new(v1::TokenizeResponse {
            tokens: tokens.iter().map(ToString::to_string).collect(),
        }))
    }

    async fn tokenize_order(
        &self,
        req: Request<v1::TokenizeOrderRequest>,
    ) -> Result<Response<v1::TokenizeOrderResponse>, Status> {
        let principal = authenticate(&self.engine, &req)?;
        let order = order_input(req.into_inner().order).map_err(status)?;
        let t = self
            .engine
            .tokenize_order(&principal, order)
            .await
            .map_err(status)?;
        Ok(Response::new(v1::TokenizeOrderResponse {
            order: Some(v1::TokenizedOrder {
                order_token: t.order_token.to_string(),
                order_number: t.order_number.to_string(),
                customer_id: opt(&t.customer_id),
                consignee: Some(v1::TokenizedConsignee {
                    name: t.name.to_string(),
                    phone: t.phone.to_string(),
                    address: t.address.to_string(),
                    id_number: opt(&t.id_number),
                    email: opt(&t.email),
                }),
                items: t
                    .items
                    .into_iter()
                    .map(|i| v1::TokenizedLineItem {
                        sku: i.sku,
                        title: i.title.to_string(),
                        quantity: i.quantity,
                        unit_price: i.unit_price.to_string(),
                        currency: i.currency,
                    })
                    .collect(),
                placed_at: opt(&t.placed_at),
            }),
        }))
    }

    async fn ping(
        &self,
        req: Request<v1::PingRequest>,
    ) -> Result<Response<v1::PingResponse>, Status> {
        authenticate(&self.engine, &req)?;
        Ok(Response::new(v1::PingResponse {}))
    }

    async fn grant(
        &self,
        req: Request<v1::GrantRequest>,
    ) -> Result<Response<v1::GrantResponse>, Status> {
        let principal = authenticate(&self.engine, &req)?;
        let m = req.into_inner();
        let g = self
            .engine
            .grant(
                &principal,
                &m.principal,
                &m.order_token,
                &m.purpose,
                m.ttl_seconds,
            )
            .await
            .map_err(status)?;
        Ok(Response::new(v1::GrantResponse {
            grant: Some(grant_info(&g)),
        }))
    }

    async fn revoke(
        &self,
        req: Request<v1::RevokeRequest>,
    ) -> Result<Response<v1::RevokeResponse>, Status> {
        let principal = authenticate(&self.engine, &req)?;
        let m = req.into_inner();
        let g = self
            .engine
            .revoke_grant(&principal, &m.grant_id)
            .await
            .map_err(status)?;
        Ok(Response::new(v1::RevokeResponse {
            grant: Some(grant_info(&g)),
        }))
    }

    async fn list_grants(
        &self,
        req: Request<v1::ListGrantsRequest>,
    ) -> Result<Response<v1::ListGrantsResponse>, Status> {
        let principal = authenticate(&self.engine, &req)?;
        let m = req.into_inner();
        let nonempty = |s: &str| (!s.is_empty()).then_some(s.to_owned());
        let grants = self
            .engine
            .list_grants(
                &principal,
                nonempty(&m.order_token).as_deref(),
                nonempty(&m.principal).as_deref(),
                m.include_inactive,
            )
            .await
            .map_err(status)?;
        Ok(Response::new(v1::ListGrantsResponse {
            grants: grants.iter().map(grant_info).collect(),
        }))
    }

    async fn reveal(
        &self,
        req: Request<v1::RevealRequest>,
    ) -> Result<Response<v1::RevealResponse>, Status> {
        let principal = authenticate(&self.engine, &req)?;
        let msg = req.into_inner();
        let tokens = msg
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| {
                Token::parse(t).map_err(|e| Status::invalid_argument(format!("token #{i} {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let revealed = self
            .engine
            .reveal(&principal, tokens, &msg.purpose)
            .await
            .map_err(status)?;
        let fields = revealed
            .into_iter()
            .map(|r| {
                let (disclosure, value, denial_reason) = match r.disclosure {
                    Disclosure::Plain(v) => (v1::Disclosure::Plain, v.to_string(), String::new()),
                    Disclosure::Masked(m) => (v1::Disclosure::Masked, m, String::new()),
                    Disclosure::Denied(why) => {
                        (v1::Disclosure::Denied, String::new(), why.to_owned())
                    }
                };
                v1::RevealedField {
                    token: r.token.to_string(),
                    kind: i32::from(r.kind.code()),
                    disclosure: disclosure as i32,
                    value,
                    denial_reason,
                }
            })
            .collect();
        Ok(Response::new(v1::RevealResponse { fields }))
    }
}
