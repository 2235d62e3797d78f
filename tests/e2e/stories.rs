//! The breach stories of DESIGN.md §1, replayed against a real vault: an
//! insider copying in bulk, an impersonation scam, credential stuffing, and
//! a supplier reaching for personal data. Each asserts the audit events and
//! alerts it must leave.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use ordervault::audit::{Action, AuditEvent, Decision};
use ordervault::engine::EngineConfig;
use ordervault::guard::AuthThrottleConfig;
use ordervault_sdk::{Client, Consignee, Order, Token};
use tonic::Code;

use crate::support::{Vault, sample_order};

fn small_order(n: usize) -> Order {
    Order {
        order_number: format!("SO-{n:08}"),
        consignee: Consignee {
            name: "李雷".into(),
            phone: format!("138{:08}", n),
            address: format!("北京市朝阳区建国路{n}号"),
            ..Consignee::default()
        },
        ..Order::default()
    }
}

fn events_of<'a>(events: &'a [AuditEvent], principal: &str, action: Action) -> Vec<&'a AuditEvent> {
    events
        .iter()
        .filter(|e| e.principal == principal && e.action == action)
        .collect()
}

/// Story 1. A support agent's credential is used to loop over every order.
/// The insider holds tickets for all of them (modelled by a policy whose
/// support role needs no grant), so only the caps stand in the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insider_copy_is_stopped_at_the_daily_cap_and_named_by_alerts() {
    const ORDERS: usize = 50_000;
    const CAP: usize = 1_000;
    let policy = ordervault::policy::DEFAULT_POLICY.replace(
        "requires_grant = true\nrate = \"300/min\"\ndaily_distinct_orders = 500",
        "requires_grant = false\nrate = \"5000/min\"\ndaily_distinct_orders = 1000",
    );
    assert_ne!(
        policy,
        ordervault::policy::DEFAULT_POLICY,
        "support section found"
    );
    let vault = Vault::start_custom(EngineConfig::default(), Some(&policy)).await;
    let shop = vault.client("shop").await;

    // Checkout of 50,000 orders, 32 at a time.
    let mut phones: Vec<Option<Token>> = vec![None; ORDERS];
    let mut next = 0;
    while next < ORDERS {
        let mut tasks = Vec::new();
        for n in next..(next + 32).min(ORDERS) {
            let shop = shop.clone();
            tasks.push(tokio::spawn(async move {
                (n, shop.tokenize_order(&small_order(n)).await.unwrap())
            }));
        }
        for t in tasks {
            let (n, order) = t.await.unwrap();
            phones[n] = Some(order.consignee.phone);
        }
        next += 32;
    }
    let phones: Vec<Token> = phones.into_iter().map(Option::unwrap).collect();

    // The insider loops over every order, 100 per request.
    let insider = vault.client("support").await;
    let (mut revealed, mut refused) = (0usize, 0usize);
    for chunk in phones.chunks(100) {
        match insider.reveal(chunk).purpose("customer_support").await {
            Ok(fields) => {
                assert!(fields.iter().all(|f| f.masked().is_some()));
                revealed += fields.len();
            }
            Err(e) => {
                assert_eq!(e.code(), Some(Code::ResourceExhausted), "{e}");
                assert!(
                    e.to_string()
                        .contains("daily cap of 1000 distinct orders reached"),
                    "{e}"
                );
                assert!(!e.to_string().contains("138"), "no value in the refusal");
                refused += 1;
            }
        }
    }
    assert_eq!(
        revealed, CAP,
        "exactly the cap was revealed, nothing beyond"
    );
    assert_eq!(refused, ORDERS / 100 - CAP / 100);

    let events = vault.audit().await;
    let shown: BTreeSet<&str> = events_of(&events, "support", Action::Reveal)
        .iter()
        .filter(|e| e.decision == Decision::Masked)
        .map(|e| e.order_token.as_deref().unwrap())
        .collect();
    assert_eq!(
        shown.len(),
        CAP,
        "the log names every order the insider saw"
    );
    let exceeded = events_of(&events, "support", Action::QuotaExceeded);
    assert_eq!(exceeded.len(), refused);
    assert!(
        exceeded
            .iter()
            .all(|e| e.reason.as_deref() == Some("daily_distinct_orders 1000"))
    );
    let alerts = vault.alerts().await;
    let kinds: Vec<(&str, &str)> = alerts
        .iter()
        .map(|a| (a.kind.as_str(), a.principal.as_str()))
        .collect();
    assert_eq!(
        kinds
            .iter()
            .filter(|k| **k == ("quota_exceeded", "support"))
            .count(),
        1,
        "{kinds:?}"
    );
    assert!(kinds.contains(&("bulk_extraction", "support")), "{kinds:?}");

    // A restart does not reset the day's count...
    let vault = vault.restart().await;
    let insider = vault.client("support").await;
    let again = insider
        .reveal(&phones[CAP..CAP + 1])
        .purpose("customer_support")
        .await;
    assert_eq!(again.unwrap_err().code(), Some(Code::ResourceExhausted));
    // ...but orders already revealed today stay revealable, and the next
    // UTC day opens a new window.
    let seen = insider
        .reveal(&phones[..10])
        .purpose("customer_support")
        .await
        .unwrap();
    assert!(seen.iter().all(|f| f.masked().is_some()));
    vault.clock.advance(86_400_000);
    let tomorrow = insider
        .reveal(&phones[CAP..CAP + 100])
        .purpose("customer_support")
        .await
        .unwrap();
    assert_eq!(tomorrow.len(), 100);
    assert_eq!(
        vault.verify().await.unwrap(),
        vault.audit().await.len() as u64
    );
    vault.stop().await;
}

/// Story 1b. The reveal rate: a token bucket per principal, shared by all
/// its connections, with a retry-after hint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reveal_rate_is_a_token_bucket_per_principal() {
    let policy = format!(
        "{}\n[principals.supplier-slow]\nrate = \"50/min\"\n",
        ordervault::policy::DEFAULT_POLICY
    );
    let mut vault = Vault::start_custom(EngineConfig::default(), Some(&policy)).await;
    vault.add_principal("supplier-slow", "supplier").await;
    let shop = vault.client("shop").await;
    let order = shop.tokenize_order(&sample_order(5)).await.unwrap();
    let title = order.items[0].title.clone();
    let one = vault.client("supplier-slow").await;
    let other_connection = vault.client("supplier-slow").await;
    let forty = vec![title.clone(); 40];
    one.reveal(&forty).purpose("fulfilment").await.unwrap();
    let err = other_connection
        .reveal(&forty[..20])
        .purpose("fulfilment")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::ResourceExhausted));
    // 10 left, 20 asked, refilling at 50/min: 12 s.
    assert!(
        err.to_string().contains("reveal rate of 50/min exceeded"),
        "{err}"
    );
    assert!(err.to_string().contains("retry in 12 s"), "{err}");
    // The unrestricted supplier is not affected.
    vault
        .client("supplier")
        .await
        .reveal(&forty)
        .purpose("fulfilment")
        .await
        .unwrap();
    vault.clock.advance(12_000);
    one.reveal(&forty[..20])
        .purpose("fulfilment")
        .await
        .unwrap();
    let events = vault.audit().await;
    let exceeded = events_of(&events, "supplier-slow", Action::QuotaExceeded);
    assert_eq!(exceeded.len(), 1);
    assert_eq!(exceeded[0].reason.as_deref(), Some("rate 50/min"));
    let alerts = vault.alerts().await;
    assert!(
        alerts
            .iter()
            .any(|a| a.kind == "quota_exceeded" && a.principal == "supplier-slow")
    );
    vault.stop().await;
}

/// Story 2. A courier reveals what it delivers, not another courier's
/// orders, and nothing once its grant has expired or been revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_courier_sees_only_its_granted_orders_until_the_grant_ends() {
    let mut vault = Vault::start().await;
    vault.add_principal("courier-a", "courier").await;
    vault.add_principal("courier-b", "courier").await;
    let shop = vault.client("shop").await;
    let a = shop.tokenize_order(&sample_order(10)).await.unwrap();
    let b = shop.tokenize_order(&sample_order(11)).await.unwrap();
    let grant_a = shop
        .grant(
            "courier-a",
            &a.order_token,
            "delivery",
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    let grant_b = shop
        .grant(
            "courier-b",
            &b.order_token,
            "delivery",
            Duration::from_secs(3600),
        )
        .await
        .unwrap();
    assert!(grant_a.id.starts_with("gr_"));

    let courier_a = vault.client("courier-a").await;
    let contact = |o: &ordervault_sdk::TokenizedOrder| {
        vec![o.consignee.phone.clone(), o.consignee.address.clone()]
    };
    let mine = courier_a
        .reveal(contact(&a))
        .purpose("delivery")
        .await
        .unwrap();
    assert_eq!(mine[0].plain(), Some("+8613910105678"));
    assert_eq!(mine[1].plain(), Some("浙江省杭州市西湖区文三路110号"));

    let theirs = courier_a
        .reveal(contact(&b))
        .purpose("delivery")
        .await
        .unwrap();
    for f in &theirs {
        assert_eq!(f.denial_reason(), Some("no_grant"));
        assert_eq!((f.plain(), f.masked()), (None, None));
    }
    // A grant is for one purpose.
    let other_purpose = courier_a
        .reveal(contact(&a))
        .purpose("customer_support")
        .await
        .unwrap_err();
    assert_eq!(other_purpose.code(), Some(Code::PermissionDenied));

    // Past the TTL the grant no longer opens the order.
    vault.clock.advance(61_000);
    let late = courier_a
        .reveal(contact(&a))
        .purpose("delivery")
        .await
        .unwrap();
    assert!(
        late.iter()
            .all(|f| f.denial_reason() == Some("grant_expired")),
        "{late:?}"
    );

    // Revoking takes effect on the next request.
    let courier_b = vault.client("courier-b").await;
    assert!(
        courier_b
            .reveal(contact(&b))
            .purpose("delivery")
            .await
            .unwrap()[0]
            .plain()
            .is_some()
    );
    let revoked = shop.revoke_grant(&grant_b.id).await.unwrap();
    assert!(revoked.revoked_at.is_some());
    let after = courier_b
        .reveal(contact(&b))
        .purpose("delivery")
        .await
        .unwrap();
    assert!(after.iter().all(|f| f.denial_reason() == Some("no_grant")));

    // Grants are listed per order and per principal.
    let of_b = shop
        .list_grants(Some(&b.order_token), None, true)
        .await
        .unwrap();
    assert_eq!(of_b.len(), 1);
    assert_eq!(of_b[0].principal, "courier-b");
    assert!(
        shop.list_grants(Some(&b.order_token), None, false)
            .await
            .unwrap()
            .is_empty()
    );
    let of_a = shop
        .list_grants(None, Some("courier-a"), true)
        .await
        .unwrap();
    assert_eq!(of_a.len(), 1);
    // The same listing from the command line (the real binary).
    let listed = std::process::Command::new(env!("CARGO_BIN_EXE_ordervault"))
        .args([
            "grants",
            "list",
            "--all",
            "--json",
            "--addr",
            &vault.url(),
            "--api-key",
            &vault.key("shop"),
        ])
        .args(["--order-token", b.order_token.as_str()])
        .output()
        .unwrap();
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let line: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(line["principal"], "courier-b");
    assert_eq!(line["grant"], grant_b.id.as_str());
    assert!(line["revoked_at"].is_string(), "{line}");
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_ordervault"))
        .args([
            "grants",
            "list",
            "--addr",
            &vault.url(),
            "--api-key",
            &vault.key("courier-a"),
        ])
        .args(["--principal", "courier-a"])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("PermissionDenied"));
    // Only roles with `grant` may grant.
    let err = courier_a
        .grant(
            "courier-a",
            &b.order_token,
            "delivery",
            Duration::from_secs(60),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied));

    let events = vault.audit().await;
    assert_eq!(events_of(&events, "shop", Action::Grant).len(), 2);
    assert_eq!(events_of(&events, "shop", Action::Revoke).len(), 1);
    let a_reveals = events_of(&events, "courier-a", Action::Reveal);
    let reasons: Vec<(Decision, Option<&str>)> = a_reveals
        .iter()
        .map(|e| (e.decision, e.reason.as_deref()))
        .collect();
    assert_eq!(
        reasons,
        vec![
            (Decision::Allowed, None),
            (Decision::Allowed, None),
            (Decision::Denied, Some("no_grant")),
            (Decision::Denied, Some("no_grant")),
            (Decision::Denied, Some("purpose_not_allowed")),
            (Decision::Denied, Some("purpose_not_allowed")),
            (Decision::Denied, Some("grant_expired")),
            (Decision::Denied, Some("grant_expired")),
        ]
    );
    assert_eq!(
        a_reveals[2].order_token.as_deref(),
        Some(b.order_token.as_str())
    );
    let denied_grant = events_of(&events, "courier-a", Action::Grant);
    assert_eq!(denied_grant.len(), 1);
    assert_eq!(denied_grant[0].decision, Decision::Denied);
    vault.stop().await;
}

/// A client whose connections come from `local` (any 127.0.0.0/8 address).
async fn client_from(local: &str, server: SocketAddr, key: &str) -> Client {
    let local: SocketAddr = format!("{local}:0").parse().unwrap();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{server}"))
        .unwrap()
        .connect_with_connector(tower::service_fn(
            move |_: tonic::codegen::http::Uri| async move {
                let socket = tokio::net::TcpSocket::new_v4()?;
                socket.bind(local)?;
                let stream = socket.connect(server).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            },
        ))
        .await
        .unwrap();
    Client::from_channel(channel).api_key(key)
}

/// Story 3. 200 wrong keys from one address in a few seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_stuffing_throttles_the_address_not_everyone() {
    let config = EngineConfig {
        auth_throttle: AuthThrottleConfig {
            max_failures: 20,
            window_ms: 60_000,
            backoff_ms: 300_000,
        },
        ..EngineConfig::default()
    };
    let vault = Vault::start_with(config).await;
    let mut codes = Vec::new();
    for i in 0..200 {
        let key = format!("ovk_stuffed{i:048}");
        let attacker = client_from("127.0.0.2", vault.addr, &key).await;
        codes.push(attacker.ping().await.unwrap_err().code().unwrap());
    }
    assert!(
        codes[..20].iter().all(|c| *c == Code::Unauthenticated),
        "{codes:?}"
    );
    assert!(
        codes[20..].iter().all(|c| *c == Code::ResourceExhausted),
        "{codes:?}"
    );
    // Even the right key is refused from that address during the back-off.
    let right_key_bad_address = client_from("127.0.0.2", vault.addr, &vault.key("shop")).await;
    let err = right_key_bad_address.ping().await.unwrap_err();
    assert_eq!(err.code(), Some(Code::ResourceExhausted));
    assert!(
        err.to_string()
            .contains("too many failed authentications from this address"),
        "{err}"
    );
    // A good client elsewhere keeps working.
    let good = client_from("127.0.0.1", vault.addr, &vault.key("shop")).await;
    good.ping().await.unwrap();
    good.tokenize_order(&sample_order(1)).await.unwrap();

    // The failures and the alert are recorded (written asynchronously).
    let mut waited = 0;
    let (failed, alerts) = loop {
        let events = vault.audit().await;
        let failed: Vec<AuditEvent> = events
            .into_iter()
            .filter(|e| e.action == Action::AuthFailed)
            .collect();
        let alerts = vault.alerts().await;
        if (failed.len() >= 20 && !alerts.is_empty()) || waited > 200 {
            break (failed, alerts);
        }
        waited += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(
        failed.len(),
        20,
        "one audit event per refused key before the block"
    );
    assert!(failed.iter().all(|e| e.peer.as_deref() == Some("127.0.0.2")
        && e.reason.as_deref() == Some("unknown_api_key")));
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0].kind, "auth_throttled");
    assert_eq!(alerts[0].peer, "127.0.0.2");

    // After the back-off the address may try again.
    vault.clock.advance(300_001);
    right_key_bad_address.ping().await.unwrap();
    vault.stop().await;
}

/// Story 4. A supplier packs items and never sees personal data, whatever
/// purpose it claims.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_supplier_sees_items_never_personal_data() {
    let vault = Vault::start().await;
    let order = vault
        .client("shop")
        .await
        .tokenize_order(&sample_order(8))
        .await
        .unwrap();
    let supplier = vault.client("supplier").await;
    let fields = supplier
        .reveal(order.all_tokens())
        .purpose("fulfilment")
        .await
        .unwrap();
    let by = |t: &Token| fields.iter().find(|f| &f.token == t).unwrap();
    assert_eq!(by(&order.items[0].title).plain(), Some("无线蓝牙耳机 Pro"));
    assert_eq!(
        by(&order.items[1].title).plain(),
        Some("Silicone case, midnight blue")
    );
    assert_eq!(order.items[1].quantity, 2);
    let c = &order.consignee;
    let personal = [
        c.name.clone(),
        c.phone.clone(),
        c.address.clone(),
        c.id_number.clone().unwrap(),
        c.email.clone().unwrap(),
        order.customer_id.clone().unwrap(),
    ];
    for t in &personal {
        assert_eq!(by(t).denial_reason(), Some("kind_not_allowed"), "{t}");
        assert_eq!((by(t).plain(), by(t).masked()), (None, None));
    }
    for claimed in ["delivery", "customer_support", "fraud_review", "audit"] {
        let err = supplier
            .reveal(&personal)
            .purpose(claimed)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(Code::PermissionDenied), "{claimed}");
    }
    let events = vault.audit().await;
    let reveals = events_of(&events, "supplier", Action::Reveal);
    let personal_tokens: BTreeSet<String> = personal.iter().map(|t| t.to_string()).collect();
    for e in &reveals {
        let token = e.token.clone().unwrap();
        if personal_tokens.contains(&token) {
            assert_eq!(e.decision, Decision::Denied, "{e:?}");
        }
    }
    let denied_by_purpose = reveals
        .iter()
        .filter(|e| e.reason.as_deref() == Some("purpose_not_allowed"))
        .count();
    assert_eq!(denied_by_purpose, 4 * personal.len());
    assert_eq!(
        reveals
            .iter()
            .filter(|e| e.decision == Decision::Allowed)
            .count(),
        6,
        "order number, 2 titles, 2 prices, time"
    );
    vault.stop().await;
}
