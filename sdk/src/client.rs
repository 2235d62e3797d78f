//! The connection to the vault and the calls over it.

use std::fmt;
use std::time::Duration;

use ordervault_proto::v1 as pb;
use ordervault_proto::v1::token_service_client::TokenServiceClient;
use secrecy::zeroize::Zeroizing;
use secrecy::{ExposeSecret, SecretString};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};

use crate::grant::grant_from_wire;
use crate::order::{order_to_wire, tokenized_order_from_reply};
use crate::reveal::revealed_from_reply;
use crate::{Error, FieldKind, Grant, Order, Reveal, Revealed, Token, TokenizedOrder};

/// How long [`Client::connect`] waits for the vault to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection to the vault, acting as one principal (API key).
///
/// Cheap to clone: clones share one HTTP/2 connection. A common pattern is
/// one [`connect`](Client::connect) per process and one
/// `client.clone().api_key(..)` per principal the process acts as.
#[derive(Clone)]
pub struct Client {
    grpc: TokenServiceClient<Channel>,
    api_key: Option<SecretString>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("api_key", &self.api_key.as_ref().map(|_| "[redacted]"))
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to the vault at `url`, such as `"http://127.0.0.1:7470"`.
    ///
    /// Fails with [`Error::Transport`] if the URL is malformed or nothing
    /// answers there within 10 seconds. The connection is re-established by itself if it drops
    /// later.
    ///
    /// This crate enables no TLS implementation in tonic; to reach a vault
    /// over TLS, build a [`Channel`] with TLS configured (enable one of
    /// tonic's `tls-*` features in your crate) and use
    /// [`from_channel`](Client::from_channel).
    pub async fn connect(url: impl Into<String>) -> Result<Client, Error> {
        let endpoint = Endpoint::from_shared(url.into())
            .map_err(|e| Error::transport(&e))?
            // Without a bound, an address that drops packets hangs the
            // caller for the OS's TCP timeout (minutes).
            .connect_timeout(CONNECT_TIMEOUT);
        let channel = endpoint.connect().await.map_err(|e| Error::transport(&e))?;
        Ok(Client::from_channel(channel))
    }

    /// A client over a channel built elsewhere: for TLS, custom timeouts, or
    /// tests that serve the vault on an in-process listener.
    pub fn from_channel(channel: Channel) -> Client {
        Client {
            grpc: TokenServiceClient::new(channel),
            api_key: None,
        }
    }

    /// Acts as the principal holding `key`: every call then carries
    /// `authorization: Bearer <key>`.
    ///
    /// The key is kept in a [`SecretString`], wiped when the last clone of
    /// this client is dropped. A key that is empty or holds anything but
    /// visible ASCII (a space, a trailing newline, a non-ASCII letter) makes
    /// every call fail with [`Error::InvalidApiKey`] before anything is sent.
    pub fn api_key(self, key: impl Into<String>) -> Client {
        Client {
            api_key: Some(SecretString::from(key.into())),
            ..self
        }
    }

    /// Tokenizes values, one token per `(kind, value)` pair, in order.
    ///
    /// All or nothing: if any value is invalid the vault stores none and
    /// answers [`Error::InvalidArgument`] naming the value's index. A request
    /// carries at most 1000 values of at most 4096 bytes each.
    ///
    /// ```no_run
    /// # async fn f(shop: ordervault_sdk::Client) -> Result<(), ordervault_sdk::Error> {
    /// use ordervault_sdk::FieldKind;
    /// let tokens = shop
    ///     .tokenize([(FieldKind::Phone, "+86 138 1234 5678"), (FieldKind::Name, "张小明")])
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn tokenize<I, S>(&self, fields: I) -> Result<Vec<Token>, Error>
    where
        I: IntoIterator<Item = (FieldKind, S)>,
        S: Into<String>,
    {
        let authorization = self.authorization()?;
        let fields: Vec<pb::Field> = fields
            .into_iter()
            .map(|(kind, value)| pb::Field {
                kind: kind.to_wire(),
                value: value.into(),
            })
            .collect();
        let sent = fields.len();
        let request = authorized(pb::TokenizeRequest { fields }, authorization);
        let reply = self.grpc.clone().tokenize(request).await?.into_inner();
        tokens_from_reply(sent, reply)
    }

    /// Tokenizes a whole order at checkout: an order token for the order as
    /// a whole plus one token per sensitive field. SKUs, quantities and
    /// currencies pass through unchanged.
    ///
    /// All or nothing, like [`tokenize`](Client::tokenize).
    pub async fn tokenize_order(&self, order: &Order) -> Result<TokenizedOrder, Error> {
        let authorization = self.authorization()?;
        let request = authorized(
            pb::TokenizeOrderRequest {
                order: Some(order_to_wire(order)),
            },
            authorization,
        );
        let reply = self
            .grpc
            .clone()
            .tokenize_order(request)
            .await?
            .into_inner();
        tokenized_order_from_reply(order.items.len(), reply)
    }

    /// Starts a reveal of `tokens`; set a [`purpose`](Reveal::purpose) and
    /// await it.
    ///
    /// Each token gets its own outcome, in order: the plain value, a mask, or
    /// a denial with a reason, as the caller's role policy says for the
    /// token's kind and the purpose. Every outcome is audited.
    pub fn reveal<I, T>(&self, tokens: I) -> Reveal
    where
        I: IntoIterator<Item = T>,
        T: AsRef<str>,
    {
        let tokens = tokens.into_iter().map(|t| t.as_ref().to_owned()).collect();
        Reveal::new(self.clone(), tokens)
    }

    /// Lets `principal` reveal the fields of the order behind `order_token`
    /// for `purpose`, for `ttl` (at most 90 days). Needs a role with the
    /// `grant` permission (the shop in the default policy). Roles that
    /// require grants (courier, support) can reveal an order only under one.
    pub async fn grant(
        &self,
        principal: &str,
        order_token: &Token,
        purpose: &str,
        ttl: Duration,
    ) -> Result<Grant, Error> {
        let authorization = self.authorization()?;
        let ttl_seconds = u32::try_from(ttl.as_secs().max(1)).unwrap_or(u32::MAX);
        let request = authorized(
            pb::GrantRequest {
                principal: principal.to_owned(),
                order_token: order_token.as_str().to_owned(),
                purpose: purpose.to_owned(),
                ttl_seconds,
            },
            authorization,
        );
        let reply = self.grpc.clone().grant(request).await?.into_inner();
        grant_from_wire(reply.grant)
    }

    /// Ends a grant; the grantee's next reveal of the order is denied.
    pub async fn revoke_grant(&self, grant_id: &str) -> Result<Grant, Error> {
        let authorization = self.authorization()?;
        let request = authorized(
            pb::RevokeRequest {
                grant_id: grant_id.to_owned(),
            },
            authorization,
        );
        let reply = self.grpc.clone().revoke(request).await?.into_inner();
        grant_from_wire(reply.grant)
    }

    /// Grants of an order, of a principal, or of both; live ones only unless
    /// `include_inactive`.
    pub async fn list_grants(
        &self,
        order_token: Option<&Token>,
        principal: Option<&str>,
        include_inactive: bool,
    ) -> Result<Vec<Grant>, Error> {
        let authorization = self.authorization()?;
        let request = authorized(
            pb::ListGrantsRequest {
                order_token: order_token
                    .map(|t| t.as_str().to_owned())
                    .unwrap_or_default(),
                principal: principal.unwrap_or_default().to_owned(),
                include_inactive,
            },
            authorization,
        );
        let reply = self.grpc.clone().list_grants(request).await?.into_inner();
        reply
            .grants
            .into_iter()
            .map(|g| grant_from_wire(Some(g)))
            .collect()
    }

    /// An authenticated no-op: checks the connection and the API key.
    pub async fn ping(&self) -> Result<(), Error> {
        let authorization = self.authorization()?;
        self.grpc
            .clone()
            .ping(authorized(pb::PingRequest {}, authorization))
            .await?;
        Ok(())
    }

    pub(crate) async fn send_reveal(
        &self,
        tokens: Vec<String>,
        purpose: String,
    ) -> Result<Vec<Revealed>, Error> {
        let authorization = self.authorization()?;
        // Tokens are not secret; keep a copy to check the reply against.
        let requested = tokens.clone();
        let request = authorized(pb::RevealRequest { tokens, purpose }, authorization);
        let reply = self.grpc.clone().reveal(request).await?.into_inner();
        revealed_from_reply(&requested, reply)
    }

    /// The `authorization` metadata value for this client's key, if any.
    fn authorization(&self) -> Result<Option<MetadataValue<Ascii>>, Error> {
        let Some(key) = &self.api_key else {
            return Ok(None);
        };
        let key = key.expose_secret();
        // RFC 6750 bearer tokens are visible ASCII without spaces. Checked
        // here because `MetadataValue` also accepts bytes 128-255 and tabs,
        // which would send a mangled key instead of failing.
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::InvalidApiKey);
        }
        // Sized up front so the string never reallocates and leaves an
        // unwiped copy of the key behind. The metadata value itself is a
        // `Bytes` inside tonic and hyper that the SDK cannot wipe.
        let mut header = Zeroizing::new(String::with_capacity("Bearer ".len() + key.len()));
        header.push_str("Bearer ");
        header.push_str(key);
        let mut value =
            MetadataValue::try_from(header.as_str()).map_err(|_| Error::InvalidApiKey)?;
        // Keeps the key out of HTTP/2 header compression tables (RFC 7541
        // §7.1.3) and out of `Debug` output of the metadata.
        value.set_sensitive(true);
        Ok(Some(value))
    }
}

fn authorized<T>(message: T, authorization: Option<MetadataValue<Ascii>>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(value) = authorization {
        request.metadata_mut().insert("authorization", value);
    }
    request
}

/// Interprets a `Tokenize` reply to a request of `sent` values.
fn tokens_from_reply(sent: usize, reply: pb::TokenizeResponse) -> Result<Vec<Token>, Error> {
    if reply.tokens.len() != sent {
        return Err(Error::Protocol(format!(
            "{sent} values were sent but the reply has {} tokens",
            reply.tokens.len()
        )));
    }
    if let Some(i) = reply.tokens.iter().position(String::is_empty) {
        return Err(Error::Protocol(format!(
            "the reply has no token for value {i}"
        )));
    }
    Ok(reply.tokens.into_iter().map(Token::from).collect())
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use ordervault_proto::v1::token_service_server::{TokenService, TokenServiceServer};
    use tokio::net::TcpListener;
    use tokio_stream::wrappers::TcpListenerStream;
    use tonic::{Request, Response, Status};

    use super::*;
    use crate::{Consignee, LineItem};

    #[test]
    fn tokenize_reply_must_match_the_request() {
        let reply = |tokens: &[&str]| pb::TokenizeResponse {
            tokens: tokens.iter().map(|t| t.to_string()).collect(),
        };
        assert_eq!(
            tokens_from_reply(2, reply(&["nm_1", "ph_1"])),
            Ok(vec![
                Token::from("nm_1".to_owned()),
                Token::from("ph_1".to_owned())
            ])
        );
        assert_eq!(
            tokens_from_reply(2, reply(&["nm_1"])),
            Err(Error::Protocol(
                "2 values were sent but the reply has 1 tokens".into()
            ))
        );
        assert_eq!(
            tokens_from_reply(2, reply(&["nm_1", ""])),
            Err(Error::Protocol("the reply has no token for value 1".into()))
        );
    }

    #[tokio::test]
    async fn api_key_that_is_not_ascii_metadata_fails_before_sending() {
        // Nothing listens on port 1: had the call been sent, it would fail
        // with Unavailable instead.
        let channel = Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
        for key in [
            "", "key\n", " key", "k ey", "k\tey", "ключ", "k\u{0}y", "k\u{7f}y",
        ] {
            let client = Client::from_channel(channel.clone()).api_key(key);
            let tokenize = client.tokenize([(FieldKind::Name, "张小明")]).await;
            assert_eq!(tokenize, Err(Error::InvalidApiKey));
            let order = client.tokenize_order(&Order::default()).await;
            assert_eq!(order, Err(Error::InvalidApiKey));
            let reveal = client.reveal(["nm_1"]).purpose("delivery").await;
            assert!(matches!(reveal, Err(Error::InvalidApiKey)));
        }
    }

    #[test]
    fn debug_of_client_hides_the_key() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a current-thread runtime needs no resources that can fail");
        let _guard = runtime.enter();
        let channel = Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
        let client = Client::from_channel(channel).api_key("ov_live_s3cr3t");
        let printed = format!("{client:?} {:?}", client.reveal(["t"]));
        assert!(!printed.contains("s3cr3t"), "{printed}");
        assert!(printed.contains("[redacted]"), "{printed}");
    }

    #[tokio::test]
    async fn connect_failures_are_transport_errors() {
        let invalid = Client::connect("not a url").await;
        assert!(matches!(invalid, Err(Error::Transport(_))), "{invalid:?}");

        // Bind, learn the port, close: nothing listens there now.
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener
            .local_addr()
            .expect("a bound socket has an address");
        drop(listener);
        let refused = Client::connect(format!("http://{addr}")).await;
        assert!(matches!(refused, Err(Error::Transport(_))), "{refused:?}");
    }

    /// What the fake vault saw of each call.
    #[derive(Default)]
    struct Seen {
        authorization: Vec<Option<String>>,
        purposes: Vec<String>,
        orders: Vec<pb::Order>,
    }

    /// A stand-in vault that records requests and answers with fixed
    /// token shapes, or with `fail` as the status of every call.
    #[derive(Clone, Default)]
    struct FakeVault {
        seen: Arc<Mutex<Seen>>,
        fail: Option<(tonic::Code, &'static str)>,
    }

    impl FakeVault {
        fn record<T>(
            &self,
            request: &Request<T>,
        ) -> Result<std::sync::MutexGuard<'_, Seen>, Status> {
            let mut seen = self
                .seen
                .lock()
                .map_err(|_| Status::internal("a test thread panicked"))?;
            let authorization = request
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(String::from);
            seen.authorization.push(authorization);
            if let Some((code, message)) = self.fail {
                return Err(Status::new(code, message));
            }
            Ok(seen)
        }
    }

    #[tonic::async_trait]
    impl TokenService for FakeVault {
        async fn grant(
            &self,
            _: Request<pb::GrantRequest>,
        ) -> Result<Response<pb::GrantResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }

        async fn revoke(
            &self,
            _: Request<pb::RevokeRequest>,
        ) -> Result<Response<pb::RevokeResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }

        async fn list_grants(
            &self,
            _: Request<pb::ListGrantsRequest>,
        ) -> Result<Response<pb::ListGrantsResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }

        async fn ping(
            &self,
            _: Request<pb::PingRequest>,
        ) -> Result<Response<pb::PingResponse>, Status> {
            Ok(Response::new(pb::PingResponse {}))
        }

        async fn tokenize(
            &self,
            request: Request<pb::TokenizeRequest>,
        ) -> Result<Response<pb::TokenizeResponse>, Status> {
            drop(self.record(&request)?);
            let tokens = request
                .into_inner()
                .fields
                .iter()
                .enumerate()
                .map(|(i, f)| format!("k{}_{i}", f.kind))
                .collect();
            Ok(Response::new(pb::TokenizeResponse { tokens }))
        }

        async fn tokenize_order(
            &self,
            request: Request<pb::TokenizeOrderRequest>,
        ) -> Result<Response<pb::TokenizeOrderResponse>, Status> {
            let mut seen = self.record(&request)?;
            let order = request.into_inner().order.unwrap_or_default();
            seen.orders.push(order.clone());
            let consignee = order.consignee.unwrap_or_default();
            let if_set = |value: &str, token: &str| {
                if value.is_empty() {
                    String::new()
                } else {
                    token.to_owned()
                }
            };
            let tokenized = pb::TokenizedOrder {
                order_token: "ord_1".into(),
                order_number: "on_1".into(),
                customer_id: if_set(&order.customer_id, "ci_1"),
                consignee: Some(pb::TokenizedConsignee {
                    name: "nm_1".into(),
                    phone: "ph_1".into(),
                    address: "ad_1".into(),
                    id_number: if_set(&consignee.id_number, "id_1"),
                    email: if_set(&consignee.email, "em_1"),
                }),
                items: order
                    .items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| pb::TokenizedLineItem {
                        sku: item.sku.clone(),
                        title: format!("od_t{i}"),
                        quantity: item.quantity,
                        unit_price: format!("od_p{i}"),
                        currency: item.currency.clone(),
                    })
                    .collect(),
                placed_at: if order.placed_at.is_some() {
                    "od_at".into()
                } else {
                    String::new()
                },
            };
            Ok(Response::new(pb::TokenizeOrderResponse {
                order: Some(tokenized),
            }))
        }

        async fn reveal(
            &self,
            request: Request<pb::RevealRequest>,
        ) -> Result<Response<pb::RevealResponse>, Status> {
            let mut seen = self.record(&request)?;
            let request = request.into_inner();
            seen.purposes.push(request.purpose);
            let fields = request
                .tokens
                .into_iter()
                .map(|token| pb::RevealedField {
                    kind: pb::FieldKind::Phone as i32,
                    disclosure: pb::Disclosure::Masked as i32,
                    value: "138****5678".into(),
                    denial_reason: String::new(),
                    token,
                })
                .collect();
            Ok(Response::new(pb::RevealResponse { fields }))
        }
    }

    /// Serves `vault` on a loopback port bound before the server task
    /// starts, so no wait for start-up is needed.
    async fn serve(vault: FakeVault) -> (Client, tokio::sync::oneshot::Sender<()>) {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener
            .local_addr()
            .expect("a bound socket has an address");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TokenServiceServer::new(vault))
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    stopped.await.ok();
                }),
        );
        let client = Client::connect(format!("http://{addr}"))
            .await
            .expect("the listener is bound");
        (client, stop)
    }

    #[tokio::test]
    async fn every_call_carries_the_bearer_key() {
        let vault = FakeVault::default();
        let (client, stop) = serve(vault.clone()).await;

        let anonymous = client.tokenize([(FieldKind::Name, "张小明")]).await;
        assert_eq!(anonymous, Ok(vec![Token::from("k1_0".to_owned())]));

        let shop = client.clone().api_key("ov_shop.K3y-_~+/=");
        shop.tokenize([(FieldKind::Phone, "+86 138 1234 5678")])
            .await
            .expect("the fake vault answers");
        shop.tokenize_order(&Order::default())
            .await
            .expect("the fake vault answers");
        shop.reveal(["ph_1"])
            .purpose("delivery")
            .await
            .expect("the fake vault answers");

        stop.send(()).ok();
        let seen = vault.seen.lock().expect("no test thread panicked");
        let bearer = Some("Bearer ov_shop.K3y-_~+/=".to_owned());
        assert_eq!(
            seen.authorization,
            [None, bearer.clone(), bearer.clone(), bearer]
        );
    }

    #[tokio::test]
    async fn tokenize_order_round_trip() {
        let vault = FakeVault::default();
        let (client, stop) = serve(vault.clone()).await;
        let order = Order {
            order_number: "SO-1".into(),
            customer_id: None,
            consignee: Consignee {
                name: "张小明".into(),
                phone: "+86 138 1234 5678".into(),
                address: "浙江省杭州市西湖区文三路123号".into(),
                id_number: None,
                email: Some("zxm@example.com".into()),
            },
            items: vec![
                LineItem {
                    sku: "SKU-A".into(),
                    title: "耳机".into(),
                    quantity: 1,
                    unit_price: "199.00".into(),
                    currency: "CNY".into(),
                },
                LineItem {
                    sku: "SKU-B".into(),
                    title: "数据线".into(),
                    quantity: 2,
                    unit_price: "29.90".into(),
                    currency: "CNY".into(),
                },
            ],
            placed_at: Some(std::time::SystemTime::now()),
        };
        let tokenized = client
            .tokenize_order(&order)
            .await
            .expect("the fake vault answers");
        stop.send(()).ok();

        assert_eq!(tokenized.order_token.as_str(), "ord_1");
        assert_eq!(tokenized.customer_id, None);
        assert_eq!(tokenized.consignee.id_number, None);
        assert_eq!(
            tokenized.consignee.email.as_ref().map(Token::as_str),
            Some("em_1")
        );
        assert_eq!(tokenized.items[1].sku, "SKU-B");
        assert_eq!(tokenized.items[1].quantity, 2);
        assert_eq!(tokenized.items[1].unit_price.as_str(), "od_p1");
        assert_eq!(
            tokenized.placed_at.as_ref().map(Token::as_str),
            Some("od_at")
        );

        let seen = vault.seen.lock().expect("no test thread panicked");
        let sent = &seen.orders[0];
        assert_eq!(sent.customer_id, "");
        assert_eq!(sent.items[1].unit_price, "29.90");
        assert!(sent.placed_at.is_some());
    }

    #[tokio::test]
    async fn reveal_sends_purpose_and_tokens() {
        let vault = FakeVault::default();
        let (client, stop) = serve(vault.clone()).await;
        let tokens = vec![
            Token::from("ph_1".to_owned()),
            Token::from("ph_2".to_owned()),
        ];

        let revealed = client
            .reveal(&tokens)
            .purpose("delivery")
            .await
            .expect("the fake vault answers");
        assert_eq!(revealed.len(), 2);
        assert_eq!(revealed[1].token, tokens[1]);
        assert_eq!(revealed[1].masked(), Some("138****5678"));

        // Without a purpose the request still goes out, with an empty one.
        client
            .reveal(&tokens)
            .await
            .expect("the fake vault answers");
        stop.send(()).ok();

        let seen = vault.seen.lock().expect("no test thread panicked");
        assert_eq!(seen.purposes, ["delivery", ""]);
    }

    #[tokio::test]
    async fn vault_statuses_reach_the_caller_as_errors() {
        let vault = FakeVault {
            fail: Some((
                tonic::Code::PermissionDenied,
                "purpose not allowed for role",
            )),
            ..FakeVault::default()
        };
        let (client, stop) = serve(vault).await;
        let error = client.reveal(["ph_1"]).purpose("marketing").await.err();
        stop.send(()).ok();
        assert_eq!(
            error,
            Some(Error::PermissionDenied(
                "purpose not allowed for role".into()
            ))
        );
    }
}
