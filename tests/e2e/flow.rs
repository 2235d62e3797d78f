//! The product story: checkout tokenizes an order; each role reveals what
//! its policy allows; every decision is audited and the log verifies.

use ordervault::engine::Clock;
use ordervault_sdk::{FieldKind, Revealed, Token, TokenizedOrder};

use crate::support::{Backend, Vault, sample_order};

fn by_token<'a>(fields: &'a [Revealed], token: &Token) -> &'a Revealed {
    fields
        .iter()
        .find(|f| &f.token == token)
        .expect("every asked token is answered")
}

fn assert_plain(fields: &[Revealed], token: &Token, value: &str) {
    let f = by_token(fields, token);
    assert_eq!(
        f.plain(),
        Some(value),
        "{token}: expected plain {value:?}, got {:?}",
        f.disclosure
    );
}

fn assert_masked(fields: &[Revealed], token: &Token, mask: &str) {
    let f = by_token(fields, token);
    assert_eq!(f.masked(), Some(mask), "{token}");
    assert_eq!(f.plain(), None);
}

fn assert_denied(fields: &[Revealed], token: &Token) {
    let f = by_token(fields, token);
    assert_eq!(f.denial_reason(), Some("kind_not_allowed"), "{token}");
    assert_eq!(f.plain(), None);
    assert_eq!(f.masked(), None);
}

/// The shop tokenizes an order and grants the courier (delivery) and the
/// support agent (customer_support) access to it for an hour.
async fn checkout(vault: &Vault) -> TokenizedOrder {
    let shop = vault.client("shop").await;
    let order = shop.tokenize_order(&sample_order(1)).await.unwrap();
    let hour = std::time::Duration::from_secs(3600);
    shop.grant("courier", &order.order_token, "delivery", hour)
        .await
        .unwrap();
    shop.grant("support", &order.order_token, "customer_support", hour)
        .await
        .unwrap();
    order
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_sees_what_its_policy_allows_on_sqlite() {
    each_role_sees_what_its_policy_allows(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_sees_what_its_policy_allows_on_postgres() {
    each_role_sees_what_its_policy_allows(Backend::Postgres).await;
}

async fn each_role_sees_what_its_policy_allows(backend: Backend) {
    let Some(vault) = Vault::start_on(backend).await else {
        return;
    };
    let order = checkout(&vault).await;
    let all = order.all_tokens();
    // Optional fields were given, so every token is there.
    assert_eq!(all.len(), 4 + 4 + 2 * 2);
    assert!(order.order_token.as_str().starts_with("ot_"));
    assert!(order.consignee.phone.as_str().starts_with("ph_"));
    assert_eq!(order.items[1].sku, "SKU-CASE");
    assert_eq!(order.items[1].quantity, 2);
    let c = &order.consignee;
    let id = c.id_number.clone().unwrap();
    let email = c.email.clone().unwrap();

    let courier = vault
        .client("courier")
        .await
        .reveal(&all)
        .purpose("delivery")
        .await
        .unwrap();
    assert_eq!(courier.len(), all.len());
    assert_plain(&courier, &c.phone, "+8613910015678");
    assert_plain(&courier, &c.address, "浙江省杭州市西湖区文三路101号");
    assert_plain(&courier, &order.order_number, "SO20261122000001");
    assert_masked(&courier, &c.name, "张*明");
    for t in [
        &id,
        &email,
        &order.items[0].title,
        &order.items[0].unit_price,
    ] {
        assert_denied(&courier, t);
    }

    let supplier = vault
        .client("supplier")
        .await
        .reveal(&all)
        .purpose("fulfilment")
        .await
        .unwrap();
    assert_plain(&supplier, &order.items[0].title, "无线蓝牙耳机 Pro");
    assert_plain(
        &supplier,
        &order.items[1].title,
        "Silicone case, midnight blue",
    );
    assert_plain(&supplier, &order.items[0].unit_price, "199.00");
    for t in [
        &c.name,
        &c.phone,
        &c.address,
        &id,
        &email,
        order.customer_id.as_ref().unwrap(),
    ] {
        assert_denied(&supplier, t);
    }

    let support = vault
        .client("support")
        .await
        .reveal(&all)
        .purpose("customer_support")
        .await
        .unwrap();
    assert_masked(&support, &c.phone, "139****5678");
    assert_masked(&support, &c.name, "张*明");
    assert_masked(&support, &id, "1****************X");
    assert_masked(&support, &email, "z***@example.com");
    assert_masked(&support, &c.address, "浙江省杭州市西湖区****");
    assert_plain(&support, &order.items[1].unit_price, "29.90");
    assert_plain(
        &support,
        order.placed_at.as_ref().unwrap(),
        "2026-11-18T11:06:40Z",
    );

    let auditor = vault
        .client("auditor")
        .await
        .reveal(&all)
        .purpose("audit")
        .await
        .unwrap();
    for t in &all {
        assert_denied(&auditor, t);
    }

    // Every reveal decision is an audit event with the right outcome, and the
    // log verifies.
    let events = vault.audit().await;
    let reveals: Vec<_> = events
        .iter()
        .filter(|e| e.action == ordervault::audit::Action::Reveal)
        .collect();
    assert_eq!(reveals.len(), 4 * all.len());
    let decision = |who: &str, token: &Token| {
        reveals
            .iter()
            .find(|e| e.principal == who && e.token.as_deref() == Some(token.as_str()))
            .map(|e| {
                (
                    e.decision.as_str(),
                    e.purpose.clone().unwrap(),
                    e.reason.clone(),
                )
            })
            .unwrap()
    };
    assert_eq!(
        decision("courier", &c.phone),
        ("allowed", "delivery".into(), None)
    );
    assert_eq!(
        decision("courier", &c.name),
        ("masked", "delivery".into(), None)
    );
    assert_eq!(
        decision("courier", &id),
        ("denied", "delivery".into(), Some("kind_not_allowed".into()))
    );
    assert_eq!(
        decision("support", &c.phone),
        ("masked", "customer_support".into(), None)
    );
    assert_eq!(
        decision("auditor", &order.order_number),
        ("denied", "audit".into(), Some("kind_not_allowed".into()))
    );
    let tokenizes = events
        .iter()
        .filter(|e| e.action == ordervault::audit::Action::Tokenize)
        .count();
    assert_eq!(tokenizes, 1);
    let grants = events
        .iter()
        .filter(|e| e.action == ordervault::audit::Action::Grant)
        .count();
    assert_eq!(grants, 2);
    // Events hold no values.
    let dump = format!("{events:?}");
    for value in [
        "张小明",
        "13910015678",
        "文三路",
        "zxm1@",
        "1949123",
        "耳机",
        "199.00",
    ] {
        assert!(!dump.contains(value), "audit events contain {value}");
    }
    assert_eq!(vault.verify().await.unwrap(), events.len() as u64);
    vault.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deterministic_kinds_give_one_token_per_normalised_value_on_sqlite() {
    deterministic_kinds_give_one_token_per_normalised_value(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deterministic_kinds_give_one_token_per_normalised_value_on_postgres() {
    deterministic_kinds_give_one_token_per_normalised_value(Backend::Postgres).await;
}

async fn deterministic_kinds_give_one_token_per_normalised_value(backend: Backend) {
    let Some(vault) = Vault::start_on(backend).await else {
        return;
    };
    let shop = vault.client("shop").await;
    let nfc = "Jos\u{e9} N\u{fa}\u{f1}ez";
    let nfd = "Jose\u{301} Nu\u{301}n\u{303}ez";
    assert_ne!(nfc, nfd);
    let t = shop
        .tokenize([
            (FieldKind::Name, nfc),
            (FieldKind::Name, nfd),
            (FieldKind::Phone, "+86 138 1234 5678"),
            (FieldKind::Phone, "13812345678"),
            (FieldKind::Address, "浙江省杭州市西湖区文三路1号"),
            (FieldKind::Address, "浙江省杭州市西湖区文三路1号"),
        ])
        .await
        .unwrap();
    assert_eq!(t[0], t[1], "NFC and NFD spellings share the name token");
    assert_eq!(t[2], t[3], "phone spellings share the phone token");
    assert_ne!(
        t[4], t[5],
        "addresses are not deterministic in the default policy"
    );
    // Across requests too, and the deduplicated token still reveals.
    let again = shop
        .tokenize([(FieldKind::Phone, "0086-138-1234-5678")])
        .await
        .unwrap();
    assert_eq!(again[0], t[2]);
    assert_eq!(vault.token_count().await, 4);
    let shop_view = shop
        .reveal([&t[2]])
        .purpose("order_management")
        .await
        .unwrap();
    assert_eq!(shop_view[0].masked(), Some("138****5678"));
    vault.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reveal_whose_audit_event_cannot_be_written_reveals_nothing_on_sqlite() {
    a_reveal_whose_audit_event_cannot_be_written_reveals_nothing(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reveal_whose_audit_event_cannot_be_written_reveals_nothing_on_postgres() {
    a_reveal_whose_audit_event_cannot_be_written_reveals_nothing(Backend::Postgres).await;
}

async fn a_reveal_whose_audit_event_cannot_be_written_reveals_nothing(backend: Backend) {
    let Some(vault) = Vault::start_on(backend).await else {
        return;
    };
    let order = checkout(&vault).await;
    let before = vault.audit().await.len();
    // The audit table refuses writes, as a full disk or a broken database would.
    vault.break_audit().await;
    let err = vault
        .client("courier")
        .await
        .reveal([&order.consignee.phone])
        .purpose("delivery")
        .await
        .expect_err("no audit, no reveal");
    assert_eq!(err.code(), Some(tonic::Code::Unavailable));
    assert!(err.to_string().contains("nothing was revealed"), "{err}");
    assert!(!err.to_string().contains("5678"));
    vault.mend_audit().await;
    assert_eq!(vault.audit().await.len(), before, "no event half-written");
    // With the log back, the same reveal works and is audited.
    let ok = vault
        .client("courier")
        .await
        .reveal([&order.consignee.phone])
        .purpose("delivery")
        .await
        .unwrap();
    assert_eq!(ok[0].plain(), Some("+8613910015678"));
    assert_eq!(vault.audit().await.len(), before + 1);
    vault.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_group_commits_and_all_land_on_sqlite() {
    concurrent_requests_share_group_commits_and_all_land(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_group_commits_and_all_land_on_postgres() {
    concurrent_requests_share_group_commits_and_all_land(Backend::Postgres).await;
}

async fn concurrent_requests_share_group_commits_and_all_land(backend: Backend) {
    let Some(vault) = Vault::start_on(backend).await else {
        return;
    };
    let shop = vault.client("shop").await;
    let mut tasks = Vec::new();
    for i in 0..64u32 {
        let shop = shop.clone();
        tasks.push(tokio::spawn(async move {
            shop.tokenize([
                (FieldKind::OrderNumber, format!("SO-{i}")),
                (FieldKind::OrderDetails, format!("item {i}")),
            ])
            .await
            .unwrap()
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    assert_eq!(vault.token_count().await, 128);
    let revealed = shop.reveal(&all).purpose("order_management").await.unwrap();
    for (i, pair) in revealed.chunks(2).enumerate() {
        let number = pair[0].plain().unwrap().to_owned();
        let n: u32 = number.trim_start_matches("SO-").parse().unwrap();
        assert_eq!(
            pair[1].plain(),
            Some(format!("item {n}").as_str()),
            "pair {i}"
        );
    }
    assert_eq!(
        vault.verify().await.unwrap(),
        vault.audit().await.len() as u64
    );
    vault.stop().await;
}

/// The body of an SDK token as the vault parses it.
fn body(token: &Token) -> [u8; 16] {
    *ordervault::token::Token::parse(token.as_str())
        .unwrap()
        .id()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_are_stored_under_time_ordered_keys_that_the_tokens_do_not_reveal() {
    let vault = Vault::start().await;
    // Keys carry the creation time modulo 2^32 ms: keep the test away from
    // the wrap so that the order below is the order of creation.
    let to_wrap = (1i64 << 32) - vault.clock.now_ms().rem_euclid(1 << 32);
    if to_wrap < 60_000 {
        vault.clock.advance(to_wrap);
    }
    let shop = vault.client("shop").await;
    let mut made = Vec::new();
    for i in 0..40 {
        vault.clock.advance(3);
        let value = format!("SO20261122{i:06}");
        let t = shop
            .tokenize([(FieldKind::OrderNumber, value.as_str())])
            .await
            .unwrap()
            .remove(0);
        made.push((t, value, vault.clock.now_ms()));
    }
    let sql = vault.sql();
    let stored: Vec<(Vec<u8>, i64)> = sql
        .prepare("SELECT id, created_ms FROM tokens")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(stored.len(), made.len());
    let mut keys = Vec::new();
    for (token, _, at) in &made {
        let t = ordervault::token::Token::parse(token.as_str()).unwrap();
        let key = vault.engine.storage_key(&t);
        let row = stored
            .iter()
            .find(|(id, _)| id[..] == key[..])
            .expect("the row is stored under the token's storage key");
        assert_eq!(row.1, *at);
        assert_eq!(
            key[..4],
            (*at as u32).to_be_bytes(),
            "key starts with the time"
        );
        assert!(
            stored.iter().all(|(id, _)| id[..] != body(token)[..]),
            "no row is keyed by a token body"
        );
        keys.push(key);
    }
    assert!(
        keys.windows(2).all(|w| w[0] < w[1]),
        "storage keys follow the order of creation"
    );
    let bodies: Vec<[u8; 16]> = made.iter().map(|(t, _, _)| body(t)).collect();
    let ascending = bodies.windows(2).filter(|w| w[0] < w[1]).count();
    assert!(
        (5..=34).contains(&ascending),
        "token bodies are in no order ({ascending} of 39 consecutive pairs ascend)"
    );

    // Everything that takes a token finds the row, before and after a restart.
    let vault = vault.restart().await;
    let shop = vault.client("shop").await;
    let tokens: Vec<&Token> = made.iter().map(|(t, _, _)| t).collect();
    let revealed = shop
        .reveal(tokens.iter().copied())
        .purpose("order_management")
        .await
        .unwrap();
    for (token, value, _) in &made {
        assert_plain(&revealed, token, value);
    }
    let order = checkout(&vault).await;
    let courier = vault
        .client("courier")
        .await
        .reveal(order.all_tokens())
        .purpose("delivery")
        .await
        .unwrap();
    assert_plain(&courier, &order.consignee.phone, "+8613910015678");
    assert_plain(&courier, &order.order_number, "SO20261122000001");
    vault.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vault_made_before_time_ordered_keys_keeps_storing_tokens_under_their_bodies() {
    let vault = Vault::start().await;
    // What a vault initialised by an earlier version holds: no layout entry.
    vault
        .sql()
        .execute("DELETE FROM meta WHERE key = 'token_ids'", [])
        .unwrap();
    let vault = vault.restart().await;
    let shop = vault.client("shop").await;
    let t = shop
        .tokenize([(FieldKind::OrderNumber, "SO20261122000009")])
        .await
        .unwrap()
        .remove(0);
    let ids: Vec<Vec<u8>> = vault
        .sql()
        .prepare("SELECT id FROM tokens")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(ids, vec![body(&t).to_vec()]);
    let vault = vault.restart().await;
    let revealed = vault
        .client("shop")
        .await
        .reveal([&t])
        .purpose("order_management")
        .await
        .unwrap();
    assert_plain(&revealed, &t, "SO20261122000009");

    // Its reveal event holds no token key (searches find such events by
    // their text) and verifies.
    let sql = vault.sql();
    let (seq, key): (i64, Option<Vec<u8>>) = sql
        .query_row(
            "SELECT seq, token_key FROM audit_events WHERE action = 'reveal' AND token = ?1",
            [t.as_str()],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(key, None);
    let auditor = ordervault::engine::Principal {
        name: "auditor".into(),
        role: "auditor".into(),
    };
    let failure = |reports: Vec<ordervault::auditor::ChainReport>| {
        reports.into_iter().find_map(|r| r.failure)
    };
    assert_eq!(
        failure(vault.engine.verify_log(&auditor).await.unwrap()),
        None
    );
    // A key on one of its events would move the event out of the text
    // index and hide it from searches by token; here anyone can compute
    // the key a newer vault would use (the body), so both verifications
    // reject any key at all.
    sql.execute(
        "UPDATE audit_events SET token_key = ?1 WHERE seq = ?2",
        rusqlite::params![body(&t).to_vec(), seq],
    )
    .unwrap();
    let bad = failure(vault.engine.verify_log(&auditor).await.unwrap()).unwrap();
    assert_eq!(bad.seq, seq as u64, "{bad:?}");
    assert!(bad.problem.contains("token key"), "{bad:?}");
    drop(sql);
    let data = vault.data_dir();
    let _dir = vault.stop().await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ordervault"))
        .args(["audit", "verify", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("fails verification at seq {seq}: a token key")),
        "{stderr}"
    );
}
