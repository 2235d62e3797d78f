//! Audit for auditors: leak tracing that names the link, evidence that
//! survives tampering, proofs checked against an independent reference.

use std::process::Command;
use std::time::Duration;

use ordervault_proto::v1;
use ordervault_proto::v1::audit_service_client::AuditServiceClient;
use ordervault_sdk::{Consignee, LineItem, Order, TokenizedOrder};
use sha2::{Digest, Sha256};
use tonic::Code;
use unicode_normalization::UnicodeNormalization;

use crate::support::Vault;

const BIN: &str = env!("CARGO_BIN_EXE_ordervault");

fn authed<T>(key: &str, m: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(m);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    r
}

async fn auditor(vault: &Vault) -> AuditServiceClient<tonic::transport::Channel> {
    AuditServiceClient::connect(vault.url()).await.unwrap()
}

const FIRST: [&str; 10] = [
    "José", "Zoë", "Amélie", "Søren", "Renée", "Chloé", "Anaïs", "Jürgen", "Björn", "Inès",
];
const LAST: [&str; 10] = [
    "Núñez",
    "Müller",
    "Dvořák",
    "Šimek",
    "García",
    "Lefèvre",
    "Østergaard",
    "Çelik",
    "Wójcik",
    "Ibáñez",
];

fn name(n: usize) -> String {
    let middle = (b'A' + (n / 100 % 10) as u8) as char;
    format!("{} {middle}. {}", FIRST[n % 10], LAST[n / 10 % 10])
}

fn phone(n: usize) -> String {
    format!("139{n:08}")
}

fn address(n: usize) -> String {
    format!("浙江省杭州市西湖区文三路{n}号")
}

fn order(n: usize) -> Order {
    Order {
        order_number: format!("SO-TRACE-{n:05}"),
        consignee: Consignee {
            name: name(n),
            phone: phone(n),
            address: address(n),
            ..Consignee::default()
        },
        items: vec![LineItem {
            sku: "SKU-1".into(),
            title: format!("item {n}"),
            quantity: 1,
            unit_price: "9.90".into(),
            currency: "CNY".into(),
        }],
        ..Order::default()
    }
}

/// The scenario of the issue: 1,000 orders; three couriers each deliver a
/// third; two suppliers; two support agents handling some tickets. A
/// hundred records that courier B revealed leak, spelled the way scammers'
/// lists spell them, plus twenty records this platform never had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_names_the_courier_whose_records_leaked() {
    let mut vault = Vault::start().await;
    for (name, role) in [
        ("courier-a", "courier"),
        ("courier-b", "courier"),
        ("courier-c", "courier"),
        ("supplier-a", "supplier"),
        ("supplier-b", "supplier"),
        ("support-a", "support"),
        ("support-b", "support"),
    ] {
        vault.add_principal(name, role).await;
    }
    let shop = vault.client("shop").await;
    let mut orders: Vec<TokenizedOrder> = Vec::new();
    for chunk in (0..1000).collect::<Vec<_>>().chunks(50) {
        let mut tasks = Vec::new();
        for &n in chunk {
            let shop = shop.clone();
            tasks.push(tokio::spawn(async move {
                shop.tokenize_order(&order(n)).await.unwrap()
            }));
        }
        for t in tasks {
            orders.push(t.await.unwrap());
        }
    }
    let couriers = ["courier-a", "courier-b", "courier-c"];
    let day = Duration::from_secs(86_400);
    for (n, o) in orders.iter().enumerate() {
        shop.grant(couriers[n % 3], &o.order_token, "delivery", day)
            .await
            .unwrap();
    }
    // Support tickets: agent a on orders 600..640, agent b on 250..290
    // (some of which courier B also delivered).
    for (agent, range) in [("support-a", 600..640), ("support-b", 250..290)] {
        for n in range {
            shop.grant(agent, &orders[n].order_token, "customer_support", day)
                .await
                .unwrap();
        }
    }
    // Everyone does their job.
    for (i, courier) in couriers.iter().enumerate() {
        let client = vault.client(courier).await;
        let mine: Vec<&TokenizedOrder> = orders.iter().skip(i).step_by(3).collect();
        for batch in mine.chunks(20) {
            let tokens: Vec<_> = batch.iter().flat_map(|o| o.all_tokens()).collect();
            client.reveal(&tokens).purpose("delivery").await.unwrap();
            // Couriers reveal at most 600 fields a minute: a working day
            // passes between batches.
            vault.clock.advance(10_000);
        }
    }
    for supplier in ["supplier-a", "supplier-b"] {
        let client = vault.client(supplier).await;
        for batch in orders.chunks(50) {
            let titles: Vec<_> = batch.iter().map(|o| o.items[0].title.clone()).collect();
            client.reveal(&titles).purpose("fulfilment").await.unwrap();
        }
    }
    for (agent, range) in [("support-a", 600..640), ("support-b", 250..290)] {
        let client = vault.client(agent).await;
        let tokens: Vec<_> = orders[range].iter().flat_map(|o| o.all_tokens()).collect();
        client
            .reveal(&tokens)
            .purpose("customer_support")
            .await
            .unwrap();
    }

    // The leak: 100 of courier B's orders (n % 3 == 1), as the scammers
    // wrote them down, then 20 strangers.
    let mut csv = String::from("name,phone,address\n");
    let b_orders: Vec<usize> = (0..1000).filter(|n| n % 3 == 1).take(100).collect();
    for (i, &n) in b_orders.iter().enumerate() {
        let name = if i % 2 == 0 {
            name(n).nfd().collect::<String>()
        } else {
            name(n)
        };
        let phone = if i % 3 == 0 {
            let p = phone(n);
            format!("+86 {} {} {}", &p[..3], &p[3..7], &p[7..])
        } else {
            phone(n)
        };
        csv.push_str(&format!("{name},{phone},\"{}\"\n", address(n)));
    }
    for s in 0..20 {
        csv.push_str(&format!(
            "Stranger {s},137{s:08},上海市浦东新区世纪大道{s}号\n"
        ));
    }
    let leak = vault.dir.path().join("leaked.csv");
    std::fs::write(&leak, &csv).unwrap();

    let out = Command::new(BIN)
        .args([
            "audit",
            "trace",
            "--json",
            "--addr",
            &vault.url(),
            "--api-key",
            &vault.key("auditor"),
        ])
        .arg(&leak)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["records"], 120);
    assert_eq!(report["records_not_held"], 20);
    assert_eq!(report["records_never_revealed"], 0);
    let not_held: Vec<u64> = serde_json::from_value(report["not_held_indexes"].clone()).unwrap();
    assert_eq!(not_held, (100..120).collect::<Vec<u64>>());
    let ranked = report["principals"].as_array().unwrap();
    assert_eq!(ranked[0]["principal"], "courier-b", "{report:#}");
    assert_eq!(ranked[0]["records_plain"], 100, "100% plaintext coverage");
    // The leaked records are its first 100 deliveries: over that period it
    // revealed exactly those, which makes it the telling link.
    assert_eq!(ranked[0]["records_revealed_total"], 100);
    assert!((ranked[0]["score"].as_f64().unwrap() - 1.0).abs() < 1e-9);
    let top = ranked[0]["score"].as_f64().unwrap();
    for other in &ranked[1..] {
        assert!(other["score"].as_f64().unwrap() < top / 4.0, "{other}");
        assert!(other["records_plain"].as_u64().unwrap() < 100);
    }
    // Support B saw some of the leaked orders, masked only.
    let support_b = ranked
        .iter()
        .find(|p| p["principal"] == "support-b")
        .unwrap();
    assert_eq!(support_b["records_plain"], 0);
    assert!(support_b["records_masked_only"].as_u64().unwrap() > 0);
    // Couriers A and C never revealed any of them.
    assert!(
        !ranked
            .iter()
            .any(|p| p["principal"] == "courier-a" || p["principal"] == "courier-c")
    );
    // The table names the same principal first.
    let table = Command::new(BIN)
        .args([
            "audit",
            "trace",
            "--addr",
            &vault.url(),
            "--api-key",
            &vault.key("auditor"),
        ])
        .arg(&leak)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.contains("120 leaked records: 20 not held by this vault, 0 held but never revealed"),
        "{text}"
    );
    let first_row = text
        .lines()
        .find(|l| l.trim_start().starts_with("1 "))
        .unwrap();
    assert!(first_row.contains("courier-b"), "{text}");
    // No leaked value reaches the report or the log.
    for needle in ["139000", "文三路", "Núñez"] {
        assert!(!text.contains(needle));
    }
    vault.stop().await;
}

/// Seqs of the events a query by `token` returns, all chains.
async fn events_about(vault: &Vault, token: &str) -> Vec<u64> {
    query_seqs(
        vault,
        v1::AuditQuery {
            token: token.to_owned(),
            ..Default::default()
        },
    )
    .await
}

/// Seqs of the events `query` returns, all chains.
async fn query_seqs(vault: &Vault, query: v1::AuditQuery) -> Vec<u64> {
    let mut s = auditor(vault)
        .await
        .query(authed(
            &vault.key("auditor"),
            v1::AuditQuery {
                chain: "*".into(),
                ..query
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let mut seqs = Vec::new();
    while let Some(e) = s.message().await.unwrap() {
        seqs.push(e.seq);
    }
    seqs
}

/// Reveal events are indexed by the revealed token's time-ordered storage
/// key (so an order's events sit together), not by its random text; the
/// key is checked by the online Verify, which names a row whose key was
/// forged to hide it from searches by token. An event without a key is
/// still found, through its text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reveal_events_are_indexed_by_storage_key_and_a_forged_key_is_named() {
    let vault = Vault::start().await;
    let shop = vault.client("shop").await;
    let day = Duration::from_secs(86_400);
    let mut tokens = Vec::new();
    for n in 0..2 {
        let o = shop.tokenize_order(&order(n)).await.unwrap();
        shop.grant("courier", &o.order_token, "delivery", day)
            .await
            .unwrap();
        let mine = vec![o.consignee.phone.clone(), o.consignee.address.clone()];
        let courier = vault.client("courier").await;
        courier.reveal(&mine).purpose("delivery").await.unwrap();
        tokens.extend(mine.into_iter().map(|t| t.as_str().to_owned()));
    }
    let sql = vault.sql();
    let reveal_of = |token: &str| -> (i64, Option<Vec<u8>>) {
        sql.query_row(
            "SELECT seq, token_key FROM audit_events WHERE action = 'reveal' AND token = ?1",
            [token],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
    };
    let key_of = |token: &str| {
        vault
            .engine
            .storage_key(&ordervault::token::Token::parse(token).unwrap())
            .to_vec()
    };
    for t in &tokens {
        let (seq, key) = reveal_of(t);
        let body = ordervault::token::Token::parse(t).unwrap().id().to_vec();
        assert_eq!(
            key.as_deref(),
            Some(&key_of(t)[..]),
            "event {seq} carries the storage key"
        );
        assert_ne!(key_of(t), body, "the key is not the token's body");
        assert_eq!(
            events_about(&vault, t).await,
            vec![seq as u64],
            "found by token"
        );
    }
    // The fields of one order are created in one request, at one time:
    // their keys, unlike their texts, start alike.
    assert_eq!(key_of(&tokens[0])[..4], key_of(&tokens[1])[..4]);
    let mut grpc = auditor(&vault).await;
    let verify = |grpc: &mut AuditServiceClient<tonic::transport::Channel>| {
        let key = vault.key("auditor");
        let mut grpc = grpc.clone();
        async move {
            grpc.verify(authed(&key, v1::VerifyRequest {}))
                .await
                .unwrap()
                .into_inner()
        }
    };
    assert!(verify(&mut grpc).await.ok);

    // An insider re-keys the first reveal's event to another token's key:
    // a search for the first token no longer finds it through the index,
    // a search for the other does not return it (its leaf names another
    // token), and the online Verify names the row.
    let (seq, _) = reveal_of(&tokens[0]);
    sql.execute(
        "UPDATE audit_events SET token_key = ?1 WHERE seq = ?2",
        rusqlite::params![key_of(&tokens[2]), seq],
    )
    .unwrap();
    assert!(events_about(&vault, &tokens[0]).await.is_empty());
    let (other, _) = reveal_of(&tokens[2]);
    assert_eq!(events_about(&vault, &tokens[2]).await, vec![other as u64]);
    let bad = verify(&mut grpc).await;
    assert!(!bad.ok);
    assert_eq!(bad.chains[0].first_bad_seq, seq as u64, "{bad:?}");
    assert!(bad.chains[0].problem.contains("token key"), "{bad:?}");

    // Without a key the event is found by its text, and nothing is wrong.
    sql.execute(
        "UPDATE audit_events SET token_key = NULL WHERE seq = ?1",
        [seq],
    )
    .unwrap();
    assert_eq!(events_about(&vault, &tokens[0]).await, vec![seq as u64]);
    assert!(verify(&mut grpc).await.ok);
    vault.stop().await;
}

/// SQLite keeps whatever type a row is given. An insider who stores an
/// event's principal as a blob of the same bytes, or its time as text,
/// hides it from searches by principal or time without changing what it
/// says; one who stores a key as text hides it from searches by token. The
/// online Verify names each such row, where reading it used to fail the
/// whole verification with an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_given_another_type_is_named_by_verify() {
    let vault = Vault::start().await;
    let shop = vault.client("shop").await;
    let o = shop.tokenize_order(&order(0)).await.unwrap();
    shop.grant(
        "courier",
        &o.order_token,
        "delivery",
        Duration::from_secs(86_400),
    )
    .await
    .unwrap();
    let phone = o.consignee.phone.clone();
    let courier = vault.client("courier").await;
    courier
        .reveal(std::slice::from_ref(&phone))
        .purpose("delivery")
        .await
        .unwrap();
    // The reveal's event is not the last one.
    shop.tokenize_order(&order(1)).await.unwrap();
    let sql = vault.sql();
    let seq: i64 = sql
        .query_row(
            "SELECT seq FROM audit_events WHERE action = 'reveal' AND token = ?1",
            [phone.as_str()],
            |r| r.get(0),
        )
        .unwrap();
    let mut grpc = auditor(&vault).await;
    let key = vault.key("auditor");
    let mut verify = async || {
        grpc.verify(authed(&key, v1::VerifyRequest {}))
            .await
            .expect("Verify answers; a damaged row is a finding, not an error")
            .into_inner()
    };
    assert!(verify().await.ok);
    let edits = [
        ("principal", "CAST(principal AS BLOB)", "blob"),
        ("ts_ms", "'at ' || ts_ms", "text"),
        ("token_key", "hex(token_key)", "text"),
        ("leaf", "CAST(leaf AS TEXT)", "text"),
    ];
    for (column, edited, stored) in edits {
        let before: Vec<u8> = sql
            .query_row(
                &format!("SELECT CAST({column} AS BLOB) FROM audit_events WHERE seq = ?1"),
                [seq],
                |r| r.get(0),
            )
            .unwrap();
        sql.execute(
            &format!("UPDATE audit_events SET {column} = {edited} WHERE seq = ?1"),
            [seq],
        )
        .unwrap();
        let bad = verify().await;
        assert!(!bad.ok, "{column}: {bad:?}");
        assert_eq!(bad.chains[0].first_bad_seq, seq as u64, "{column}: {bad:?}");
        let problem = &bad.chains[0].problem;
        assert!(
            problem.contains(column) && problem.contains(stored),
            "{column}: {problem}"
        );
        // Put back as it was: the log verifies again.
        sql.execute(
            &format!("UPDATE audit_events SET {column} = ?1 WHERE seq = ?2"),
            rusqlite::params![before, seq],
        )
        .unwrap();
        if column != "token_key" && column != "leaf" {
            // Stored back as a blob: put the type back too.
            sql.execute(
                &format!(
                    "UPDATE audit_events SET {column} = CAST({column} AS {}) WHERE seq = ?1",
                    if column == "ts_ms" { "INTEGER" } else { "TEXT" }
                ),
                [seq],
            )
            .unwrap();
        }
        assert!(verify().await.ok, "{column} restored");
    }
    // An order token edited to another order, or emptied (the event would
    // then be counted by its token), changes how many records the
    // principal is counted to have revealed (leak traces): named.
    for edited in ["'od_forged'", "NULL"] {
        sql.execute(
            &format!("UPDATE audit_events SET order_token = {edited} WHERE seq = ?1"),
            [seq],
        )
        .unwrap();
        let bad = verify().await;
        assert!(!bad.ok, "order_token {edited}: {bad:?}");
        assert_eq!(bad.chains[0].first_bad_seq, seq as u64, "{bad:?}");
        assert!(
            bad.chains[0].problem.contains("indexed columns differ"),
            "{bad:?}"
        );
        sql.execute(
            "UPDATE audit_events SET order_token = ?1 WHERE seq = ?2",
            rusqlite::params![o.order_token.as_str(), seq],
        )
        .unwrap();
        assert!(verify().await.ok, "order_token restored after {edited}");
    }

    // A seq of another type sorts after every number and is greater than
    // any: the row is not read at all, and its seq is missing.
    sql.execute(
        "UPDATE audit_events SET seq = CAST(seq AS BLOB) WHERE seq = ?1",
        [seq],
    )
    .unwrap();
    let bad = verify().await;
    assert!(!bad.ok, "seq: {bad:?}");
    assert_eq!(bad.chains[0].first_bad_seq, seq as u64, "seq: {bad:?}");
    assert!(bad.chains[0].problem.contains("missing"), "seq: {bad:?}");
    // Searches end (paging on from the last seq seen never starts over).
    let mut s = grpc
        .query(authed(
            &key,
            v1::AuditQuery {
                principal: "courier".into(),
                chain: "*".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let seen = tokio::time::timeout(Duration::from_secs(30), async {
        let mut seen = Vec::new();
        while let Some(e) = s.message().await.unwrap() {
            seen.push(e.seq);
        }
        seen
    })
    .await
    .expect("the query ends");
    assert!(!seen.contains(&(seq as u64)), "{seen:?}");
    vault.stop().await;
}

/// The SQLite store finds a token's audit events through an index it
/// builds in batches, apart from the events: an edit of that index that
/// would hide a reveal from searches and leak traces is named by Verify.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_that_hides_a_reveal_from_searches_is_named_by_verify() {
    let vault = Vault::start().await;
    let shop = vault.client("shop").await;
    let o = shop.tokenize_order(&order(0)).await.unwrap();
    shop.grant(
        "courier",
        &o.order_token,
        "delivery",
        Duration::from_secs(86_400),
    )
    .await
    .unwrap();
    let courier = vault.client("courier").await;
    let phone = o.consignee.phone.clone();
    let name = o.consignee.name.clone();
    courier
        .reveal(std::slice::from_ref(&phone))
        .purpose("delivery")
        .await
        .unwrap();
    let sql = vault.sql();
    let reveal_of = |token: &str| -> (String, i64) {
        sql.query_row(
            "SELECT chain, seq FROM audit_events WHERE action = 'reveal' AND token = ?1",
            [token],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
    };
    let (chain, seq) = reveal_of(phone.as_str());
    // Idle, the writer indexes what is past the mark.
    let indexed = |seq: i64| -> bool {
        sql.query_row(
            "SELECT count(*) FROM audit_token_index WHERE chain = ?1 AND seq = ?2",
            rusqlite::params![chain, seq],
            |r| r.get::<_, i64>(0),
        )
        .unwrap()
            == 1
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !indexed(seq) {
        assert!(
            std::time::Instant::now() < deadline,
            "the reveal was never indexed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut grpc = auditor(&vault).await;
    let key = vault.key("auditor");
    let mut verify = async || {
        grpc.verify(authed(&key, v1::VerifyRequest {}))
            .await
            .unwrap()
            .into_inner()
    };
    assert!(verify().await.ok);
    let reveals_of = async |token: &str| -> Vec<u64> {
        let query = v1::AuditQuery {
            token: token.into(),
            action: "reveal".into(),
            ..Default::default()
        };
        query_seqs(&vault, query).await
    };
    assert_eq!(reveals_of(phone.as_str()).await, vec![seq as u64]);

    // The reveal's index entry deleted: searches miss it, Verify names it.
    sql.execute(
        "DELETE FROM audit_token_index WHERE chain = ?1 AND seq = ?2",
        rusqlite::params![chain, seq],
    )
    .unwrap();
    assert!(
        reveals_of(phone.as_str()).await.is_empty(),
        "the search goes through the index"
    );
    let bad = verify().await;
    assert!(!bad.ok, "{bad:?}");
    assert_eq!(bad.chains[0].first_bad_seq, seq as u64, "{bad:?}");
    assert!(bad.chains[0].problem.contains("token index"), "{bad:?}");
    // Put back: the log verifies again.
    sql.execute(
        "INSERT INTO audit_token_index (token_key, chain, seq)
         SELECT token_key, chain, seq FROM audit_events WHERE chain = ?1 AND seq = ?2",
        rusqlite::params![chain, seq],
    )
    .unwrap();
    assert!(verify().await.ok, "entry restored");
    assert_eq!(reveals_of(phone.as_str()).await, vec![seq as u64]);

    // The mark moved ahead of the log: the next reveals are neither
    // indexed nor scanned.
    sql.execute(
        "UPDATE audit_token_upto SET upto = upto + 1000 WHERE chain = ?1",
        [&chain],
    )
    .unwrap();
    courier
        .reveal(std::slice::from_ref(&name))
        .purpose("delivery")
        .await
        .unwrap();
    let (_, later) = reveal_of(name.as_str());
    assert!(reveals_of(name.as_str()).await.is_empty());
    let bad = verify().await;
    assert!(!bad.ok, "{bad:?}");
    assert_eq!(bad.chains[0].first_bad_seq, later as u64, "{bad:?}");
    assert!(bad.chains[0].problem.contains("token index"), "{bad:?}");

    // The README's rebuild puts it right.
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let rebuild = readme
        .split("To rebuild the index")
        .nth(1)
        .and_then(|rest| rest.split("```sql\n").nth(1))
        .and_then(|block| block.split("```").next())
        .expect("the README shows how to rebuild the token index");
    sql.execute_batch(rebuild).unwrap();
    assert!(verify().await.ok, "rebuilt");
    assert_eq!(reveals_of(name.as_str()).await, vec![later as u64]);
    assert_eq!(reveals_of(phone.as_str()).await, vec![seq as u64]);
    drop(sql);
    vault.stop().await;
}

/// Drives enough activity to have a few checkpoints, returns (export path, pubkey).
async fn exported(vault: &Vault, rounds: usize) -> (std::path::PathBuf, String) {
    let shop = vault.client("shop").await;
    let supplier = vault.client("supplier").await;
    for n in 0..rounds {
        let o = shop.tokenize_order(&order(n)).await.unwrap();
        supplier
            .reveal(o.all_tokens())
            .purpose("fulfilment")
            .await
            .unwrap();
        if n % 4 == 3 {
            vault.engine.checkpoint_now().await.unwrap();
        }
    }
    let path = vault.dir.path().join(format!("export-{rounds}.jsonl"));
    let out = Command::new(BIN)
        .args([
            "audit",
            "export",
            "--addr",
            &vault.url(),
            "--api-key",
            &vault.key("auditor"),
            "--out",
        ])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pubkey = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("public key: ").map(str::to_owned))
        .unwrap();
    (path, pubkey)
}

fn verify_file(path: &std::path::Path, pubkey: &str, extra: &[&str]) -> (bool, String) {
    let out = Command::new(BIN)
        .args(["audit", "verify", "--pubkey", pubkey, "--file"])
        .arg(path)
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampering_with_an_export_is_detected_and_named() {
    let vault = Vault::start().await;
    let (path, pubkey) = exported(&vault, 12).await;
    let (ok, text) = verify_file(&path, &pubkey, &[]);
    assert!(ok, "{text}");
    assert!(text.contains("checkpoints verified"), "{text}");
    let lines: Vec<String> = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    let event_line = |seq: u64| {
        lines
            .iter()
            .position(|l| {
                l.contains("\"type\":\"event\"") && l.contains(&format!("\"seq\":{seq},"))
            })
            .unwrap()
    };
    let write = |name: &str, lines: &[String]| {
        let p = vault.dir.path().join(name);
        std::fs::write(&p, lines.join("\n")).unwrap();
        p
    };
    let expect_bad = |name: &str, lines: Vec<String>, seq: u64, why: &str| {
        let (ok, text) = verify_file(&write(name, &lines), &pubkey, &[]);
        assert!(!ok, "{name} must fail");
        assert!(text.contains(&format!("at seq {seq}:")), "{name}: {text}");
        assert!(text.contains(why), "{name}: {text}");
    };
    // Edit a field: who revealed it.
    let mut edited = lines.clone();
    let i = event_line(20);
    edited[i] = edited[i].replace("supplier", "support");
    assert_ne!(edited[i], lines[i]);
    expect_bad("edited", edited, 20, "edited");
    // Delete an event.
    let mut deleted = lines.clone();
    deleted.remove(event_line(17));
    expect_bad("deleted", deleted, 17, "missing");
    // Insert a forged event (a replay of an earlier one).
    let mut inserted = lines.clone();
    let forged = lines[event_line(5)].clone();
    inserted.insert(event_line(9), forged);
    expect_bad("inserted", inserted, 9, "inserted or reordered");
    // Swap two events.
    let mut swapped = lines.clone();
    swapped.swap(event_line(30), event_line(31));
    expect_bad("swapped", swapped, 30, "missing");
    // Truncate the tail after a checkpoint: the checkpoint stays, its events go.
    let cp_size: u64 = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["type"] == "checkpoint")
        .map(|v| v["size"].as_u64().unwrap())
        .max()
        .unwrap();
    let truncated: Vec<String> = lines
        .iter()
        .filter(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["type"] == "checkpoint" || v["seq"].as_u64().unwrap() <= cp_size - 5
        })
        .cloned()
        .collect();
    expect_bad(
        "truncated",
        truncated,
        cp_size - 4,
        "truncated or rolled back",
    );
    vault.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampering_with_the_database_is_detected_online_and_a_rollback_by_a_kept_checkpoint() {
    let vault = Vault::start().await;
    let (_, pubkey) = exported(&vault, 8).await;
    // The auditor keeps the latest signed checkpoint.
    let mut grpc = auditor(&vault).await;
    let cps = grpc
        .checkpoints(authed(
            &vault.key("auditor"),
            v1::CheckpointsRequest {
                chain: String::new(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let early = cps.checkpoints[0].clone();
    let early_size: u64 = early.lines().nth(1).unwrap().parse().unwrap();
    let verify = grpc
        .verify(authed(&vault.key("auditor"), v1::VerifyRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert!(verify.ok, "{verify:?}");

    // An insider keeps a copy of the database now...
    let sql = vault.sql();
    sql.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
        .unwrap();
    let backup = vault.dir.path().join("backup.db");
    sql.execute("VACUUM INTO ?1", [backup.to_str().unwrap()])
        .unwrap();
    // ...more happens, the auditor saves a newer checkpoint...
    let (_, _) = exported(&vault, 8).await;
    let later = grpc
        .checkpoints(authed(
            &vault.key("auditor"),
            v1::CheckpointsRequest {
                chain: String::new(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .checkpoints
        .pop()
        .unwrap();
    let kept = vault.dir.path().join("kept.note");
    std::fs::write(&kept, &later).unwrap();

    // An edited row is named by the online Verify.
    let seq: i64 = sql
        .query_row(
            "SELECT max(seq) FROM audit_events WHERE action = 'reveal'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    sql.execute(
        "UPDATE audit_events SET leaf = CAST(replace(CAST(leaf AS TEXT), 'fulfilment', 'delivery') AS BLOB) WHERE seq = ?1",
        [seq],
    )
    .unwrap();
    let verify = grpc
        .verify(authed(&vault.key("auditor"), v1::VerifyRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert!(!verify.ok);
    assert_eq!(verify.chains[0].first_bad_seq, seq as u64, "{verify:?}");

    // The insider rolls the database back to the copy.
    drop(sql);
    let data = vault.data_dir();
    let dir = vault.stop().await;
    std::fs::copy(&backup, data.join("vault.db")).unwrap();
    let _ = std::fs::remove_file(data.join("vault.db-wal"));
    let _ = std::fs::remove_file(data.join("vault.db-shm"));
    let served = Command::new(BIN)
        .args(["audit", "verify", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    // The rolled-back database is internally consistent...
    assert!(
        served.status.success(),
        "{}",
        String::from_utf8_lossy(&served.stderr)
    );
    // ...an export of it is too, but not with the checkpoint the auditor kept.
    let rolled = dir.path().join("rolled.jsonl");
    let conn = rusqlite::Connection::open(data.join("vault.db")).unwrap();
    let mut lines = Vec::new();
    let mut st = conn
        .prepare("SELECT chain, seq, leaf, chain_hash FROM audit_events ORDER BY seq")
        .unwrap();
    let rows = st
        .query_map([], |r| {
            Ok(serde_json::json!({
                "type": "event",
                "chain": r.get::<_, String>(0)?,
                "seq": r.get::<_, i64>(1)?,
                "leaf": String::from_utf8(r.get::<_, Vec<u8>>(2)?).unwrap(),
                "chain_hash": hex::encode(r.get::<_, Vec<u8>>(3)?),
            }))
        })
        .unwrap();
    for row in rows {
        lines.push(row.unwrap().to_string());
    }
    let rolled_size = lines.len() as u64;
    std::fs::write(&rolled, lines.join("\n")).unwrap();
    let (ok, text) = verify_file(&rolled, &pubkey, &[]);
    assert!(ok, "{text}");
    let (ok, text) = verify_file(&rolled, &pubkey, &["--checkpoint", kept.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        text.contains(&format!("at seq {}:", rolled_size + 1)),
        "{text}"
    );
    assert!(text.contains("truncated or rolled back"), "{text}");
    assert!(early_size <= rolled_size);
}

// An independent reference for RFC 9162 §2.1, written from the RFC's
// definitions and sharing no code with the vault.

fn sha(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

fn mth(leaves: &[[u8; 32]]) -> [u8; 32] {
    match leaves.len() {
        0 => sha(&[]),
        1 => leaves[0],
        n => {
            let k = n.next_power_of_two() / 2;
            let k = if k == n { k / 2 } else { k };
            sha(&[&[1], &mth(&leaves[..k]), &mth(&leaves[k..])])
        }
    }
}

/// RFC 9162 §2.1.3.2.
fn ref_verify_inclusion(
    index: u64,
    size: u64,
    leaf: [u8; 32],
    proof: &[[u8; 32]],
    root: [u8; 32],
) -> bool {
    if index >= size {
        return false;
    }
    let (mut fn_, mut sn) = (index, size - 1);
    let mut r = leaf;
    for p in proof {
        if sn == 0 {
            return false;
        }
        if fn_ & 1 == 1 || fn_ == sn {
            r = sha(&[&[1], p, &r]);
            if fn_ & 1 == 0 {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            r = sha(&[&[1], &r, p]);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    sn == 0 && r == root
}

/// RFC 9162 §2.1.4.2.
fn ref_verify_consistency(
    first: u64,
    second: u64,
    first_hash: [u8; 32],
    second_hash: [u8; 32],
    proof: &[[u8; 32]],
) -> bool {
    if first == second {
        return proof.is_empty() && first_hash == second_hash;
    }
    let mut path: Vec<[u8; 32]> = proof.to_vec();
    if first.is_power_of_two() {
        path.insert(0, first_hash);
    }
    let (mut fn_, mut sn) = (first - 1, second - 1);
    while fn_ & 1 == 1 {
        fn_ >>= 1;
        sn >>= 1;
    }
    let Some((&c, rest)) = path.split_first() else {
        return false;
    };
    let (mut fr, mut sr) = (c, c);
    for p in rest {
        if sn == 0 {
            return false;
        }
        if fn_ & 1 == 1 || fn_ == sn {
            fr = sha(&[&[1], p, &fr]);
            sr = sha(&[&[1], p, &sr]);
            if fn_ & 1 == 0 {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            sr = sha(&[&[1], &sr, p]);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    fr == first_hash && sr == second_hash && sn == 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inclusion_and_consistency_proofs_match_an_independent_reference() {
    let vault = Vault::start().await;
    let shop = vault.client("shop").await;
    while vault.audit().await.len() < 300 {
        shop.tokenize([(ordervault_sdk::FieldKind::OrderDetails, "x")])
            .await
            .unwrap();
    }
    let key = vault.key("auditor");
    let mut grpc = auditor(&vault).await;
    let events: Vec<v1::AuditEventInfo> = {
        let mut s = grpc
            .query(authed(
                &key,
                v1::AuditQuery {
                    limit: 300,
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner();
        let mut v = Vec::new();
        while let Some(e) = s.message().await.unwrap() {
            v.push(e);
        }
        v
    };
    assert_eq!(events.len(), 300);
    let leaves: Vec<[u8; 32]> = events.iter().map(|e| sha(&[&[0], &e.leaf])).collect();
    let h = |b: &[u8]| <[u8; 32]>::try_from(b).unwrap();
    for size in 1..=300u64 {
        let root = mth(&leaves[..size as usize]);
        let mut seqs = vec![1, size, size.div_ceil(2)];
        seqs.dedup();
        for seq in seqs {
            let p = grpc
                .prove(authed(
                    &key,
                    v1::ProveRequest {
                        chain: String::new(),
                        seq,
                        tree_size: size,
                        old_size: 0,
                    },
                ))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(h(&p.root_hash), root, "size {size}");
            assert_eq!(h(&p.leaf_hash), leaves[seq as usize - 1]);
            let proof: Vec<[u8; 32]> = p.hashes.iter().map(|x| h(x)).collect();
            assert!(
                ref_verify_inclusion(seq - 1, size, leaves[seq as usize - 1], &proof, root),
                "incl {seq}/{size}"
            );
            assert!(!ref_verify_inclusion(
                seq - 1,
                size,
                sha(&[b"forged"]),
                &proof,
                root
            ));
        }
        for old in [1, size / 2, size - 1].into_iter().filter(|o| *o >= 1) {
            let p = grpc
                .prove(authed(
                    &key,
                    v1::ProveRequest {
                        chain: String::new(),
                        seq: 0,
                        tree_size: size,
                        old_size: old,
                    },
                ))
                .await
                .unwrap()
                .into_inner();
            let proof: Vec<[u8; 32]> = p.hashes.iter().map(|x| h(x)).collect();
            let old_root = mth(&leaves[..old as usize]);
            assert!(
                ref_verify_consistency(old, size, old_root, root, &proof),
                "cons {old}->{size}"
            );
            if old < size {
                assert!(!ref_verify_consistency(
                    old,
                    size,
                    sha(&[b"other"]),
                    root,
                    &proof
                ));
            }
        }
    }
    vault.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_auditors_and_admins_read_the_log() {
    let vault = Vault::start().await;
    let mut grpc = auditor(&vault).await;
    for role in ["courier", "shop", "supplier", "support"] {
        let err = grpc
            .query(authed(&vault.key(role), v1::AuditQuery::default()))
            .await
            .map(|_| ())
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{role}");
        assert!(
            err.message().contains("`audit` permission"),
            "{}",
            err.message()
        );
    }
    let denied: Vec<_> = vault
        .audit()
        .await
        .into_iter()
        .filter(|e| {
            e.decision == ordervault::audit::Decision::Denied
                && e.reason
                    .as_deref()
                    .is_some_and(|r| r.contains("audit_not_allowed"))
        })
        .map(|e| e.principal)
        .collect();
    assert_eq!(denied, vec!["courier", "shop", "supplier", "support"]);
    for role in ["auditor", "admin"] {
        let mut s = grpc
            .query(authed(
                &vault.key(role),
                v1::AuditQuery {
                    principal: "courier".into(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner();
        let mut n = 0;
        while let Some(e) = s.message().await.unwrap() {
            let text = String::from_utf8(e.leaf).unwrap();
            assert!(text.contains("\"principal\":\"courier\""));
            n += 1;
        }
        assert_eq!(n, 1, "{role}");
    }
    vault.stop().await;
}
