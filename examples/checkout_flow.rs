//! Checkout → courier → supplier → customer support → auditor, against a
//! running vault.
//!
//! The shop tokenizes an order at checkout; then each downstream role
//! reveals every token of it for its own purpose, and sees what its role
//! policy allows: the plain value, a mask, or a denial with a reason.
//!
//! ```text
//! cargo run --release -p ordervault -- serve --dev     # prints the keys below
//! export OV_SHOP_KEY=... OV_COURIER_KEY=... OV_SUPPLIER_KEY=... \
//!        OV_SUPPORT_KEY=... OV_AUDITOR_KEY=...
//! cargo run --release -p ordervault-sdk --example checkout_flow
//! ```
//!
//! `ORDERVAULT_ADDR` overrides the vault's address (default
//! `http://127.0.0.1:7470`). Exits 2 when a key is missing, 1 when the vault
//! cannot be reached, the order cannot be tokenized or a role's call fails.

use std::env;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use ordervault_sdk::{Client, Consignee, Error, LineItem, Order, Revealed, Token, TokenizedOrder};

const DEFAULT_ADDR: &str = "http://127.0.0.1:7470";
const SHOP_KEY: &str = "OV_SHOP_KEY";

/// Each downstream role: its name, the variable holding its key, and the
/// purpose it states.
const ROLES: [(&str, &str, &str); 4] = [
    ("courier", "OV_COURIER_KEY", "delivery"),
    ("supplier", "OV_SUPPLIER_KEY", "fulfilment"),
    ("support", "OV_SUPPORT_KEY", "customer_support"),
    ("auditor", "OV_AUDITOR_KEY", "audit"),
];

#[tokio::main]
async fn main() -> ExitCode {
    let addr = env::var("ORDERVAULT_ADDR").unwrap_or_else(|_| DEFAULT_ADDR.to_owned());

    // All keys first, so a missing one stops the walk before anything is
    // tokenized.
    let mut missing = Vec::new();
    let mut key = |var: &'static str| match env::var(var) {
        Ok(key) if !key.trim().is_empty() => key,
        _ => {
            missing.push(var);
            String::new()
        }
    };
    let shop_key = key(SHOP_KEY);
    let role_keys = ROLES.map(|(_, var, _)| key(var));
    if !missing.is_empty() {
        eprintln!("error: no API key in {}.", missing.join(", "));
        eprintln!(
            "The first start of `cargo run --release -p ordervault -- serve --dev` prints \
             all five keys as `export` lines ready to paste into this shell; \
             then run this example again."
        );
        return ExitCode::from(2);
    }

    let vault = match Client::connect(&addr).await {
        Ok(vault) => vault,
        Err(e) => {
            eprintln!("error: {e}");
            eprintln!(
                "Is the vault running? Start it with \
                 `cargo run --release -p ordervault -- serve --dev`, \
                 or set ORDERVAULT_ADDR (now {addr})."
            );
            return ExitCode::FAILURE;
        }
    };

    // Checkout: the shop tokenizes the order and keeps only the tokens.
    let order = order();
    println!("shop: tokenize order ({} line items)", order.items.len());
    let shop = vault.clone().api_key(shop_key);
    let tokenized = match shop.tokenize_order(&order).await {
        Ok(tokenized) => tokenized,
        Err(e) => {
            eprintln!("error: the shop could not tokenize the order: {e}");
            hint(&e, SHOP_KEY);
            return ExitCode::FAILURE;
        }
    };
    // The plain order is not needed past checkout.
    drop(order);
    print_tokenized(&tokenized);

    // The shop hands the order to a courier and opens a support ticket:
    // couriers and support agents can reveal an order only under a grant.
    for (grantee, purpose) in [("courier", "delivery"), ("support", "customer_support")] {
        match shop
            .grant(
                grantee,
                &tokenized.order_token,
                purpose,
                std::time::Duration::from_secs(24 * 3600),
            )
            .await
        {
            Ok(g) => println!(
                "shop: granted {grantee} the order for {purpose:?} for 24 h ({})",
                g.id
            ),
            Err(e) => {
                eprintln!("error: the shop could not grant {grantee} access: {e}");
                return ExitCode::FAILURE;
            }
        }
    }

    // Downstream: each role reveals every field token for its purpose.
    let fields = field_tokens(&tokenized);
    let mut failed = 0;
    for ((role, var, purpose), key) in ROLES.into_iter().zip(role_keys) {
        println!();
        println!(
            "{role}: reveal {} tokens for purpose {purpose:?}",
            fields.len()
        );
        let client = vault.clone().api_key(key);
        match client
            .reveal(fields.iter().map(|(_, token)| token))
            .purpose(purpose)
            .await
        {
            Ok(revealed) => print_revealed(role, &fields, &revealed),
            Err(e) => {
                failed += 1;
                println!("  error: {e}");
                hint(&e, var);
            }
        }
    }

    if failed > 0 {
        println!();
        println!("{failed} of {} role calls failed as a whole.", ROLES.len());
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// The order of the walkthrough; the order number changes per run.
fn order() -> Order {
    let now = SystemTime::now();
    let seconds = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    Order {
        order_number: format!("SO-{seconds}"),
        customer_id: Some("C-100042".to_owned()),
        consignee: Consignee {
            name: "张小明".to_owned(),
            phone: "+86 138 1234 5678".to_owned(),
            address: "浙江省杭州市西湖区文三路123号".to_owned(),
            id_number: Some("11010519491231002X".to_owned()),
            email: Some("zxm@example.com".to_owned()),
        },
        items: vec![
            LineItem {
                sku: "SKU-EAR-PRO-WHT".to_owned(),
                title: "无线蓝牙耳机 Pro 白色".to_owned(),
                quantity: 1,
                unit_price: "399.00".to_owned(),
                currency: "CNY".to_owned(),
            },
            LineItem {
                sku: "SKU-CBL-USBC-1M".to_owned(),
                title: "USB-C 快充数据线 1米".to_owned(),
                quantity: 2,
                unit_price: "29.90".to_owned(),
                currency: "CNY".to_owned(),
            },
        ],
        placed_at: Some(now),
    }
}

/// Every field token of the order with the field it stands for, in the
/// order of [`TokenizedOrder::all_tokens`].
fn field_tokens(order: &TokenizedOrder) -> Vec<(String, Token)> {
    let consignee = &order.consignee;
    let mut fields = vec![("order_number".to_owned(), order.order_number.clone())];
    let optional = |fields: &mut Vec<(String, Token)>, name: &str, token: &Option<Token>| {
        if let Some(token) = token {
            fields.push((name.to_owned(), token.clone()));
        }
    };
    optional(&mut fields, "customer_id", &order.customer_id);
    fields.push(("consignee.name".to_owned(), consignee.name.clone()));
    fields.push(("consignee.phone".to_owned(), consignee.phone.clone()));
    fields.push(("consignee.address".to_owned(), consignee.address.clone()));
    optional(&mut fields, "consignee.id_number", &consignee.id_number);
    optional(&mut fields, "consignee.email", &consignee.email);
    for (i, item) in order.items.iter().enumerate() {
        fields.push((format!("items[{i}].title"), item.title.clone()));
        fields.push((format!("items[{i}].unit_price"), item.unit_price.clone()));
    }
    optional(&mut fields, "placed_at", &order.placed_at);
    fields
}

fn print_tokenized(order: &TokenizedOrder) {
    let fields = field_tokens(order);
    let width = fields
        .iter()
        .map(|(name, _)| name.len())
        .max()
        .unwrap_or(0)
        .max("order_token".len());
    println!("  {:width$}  {}", "order_token", order.order_token);
    for (name, token) in &fields {
        println!("  {name:width$}  {token}");
    }
    for (i, item) in order.items.iter().enumerate() {
        println!(
            "  {:width$}  sku {}, quantity {}, currency {} (passed through)",
            format!("items[{i}]"),
            item.sku,
            item.quantity,
            item.currency
        );
    }
}

/// One aligned table: field, kind, shortened token, and what the role sees.
fn print_revealed(role: &str, fields: &[(String, Token)], revealed: &[Revealed]) {
    let rows: Vec<[String; 4]> = fields
        .iter()
        .zip(revealed)
        .map(|((name, _), field)| {
            let sees = if let Some(value) = field.plain() {
                value.to_owned()
            } else if let Some(mask) = field.masked() {
                format!("{mask} (masked)")
            } else {
                format!("denied ({})", field.denial_reason().unwrap_or(""))
            };
            let kind = field.kind.map_or("?", |kind| kind.as_str());
            [name.clone(), kind.to_owned(), shorten(&field.token), sees]
        })
        .collect();
    let header = ["field", "kind", "token", &format!("{role} sees")].map(str::to_owned);
    let width = |column: usize| {
        rows.iter()
            .chain([&header])
            .map(|row| row[column].chars().count())
            .max()
            .unwrap_or(0)
    };
    let (w0, w1, w2) = (width(0), width(1), width(2));
    for row in [&header].into_iter().chain(&rows) {
        println!(
            "  {:w0$}  {:w1$}  {:w2$}  {}",
            row[0], row[1], row[2], row[3]
        );
    }
}

/// The head and tail of a token: enough to tell tokens apart on screen.
fn shorten(token: &Token) -> String {
    const HEAD: usize = 8;
    const TAIL: usize = 4;
    let chars: Vec<char> = token.as_str().chars().collect();
    if chars.len() <= HEAD + TAIL + 1 {
        return token.to_string();
    }
    let head: String = chars[..HEAD].iter().collect();
    let tail: String = chars[chars.len() - TAIL..].iter().collect();
    format!("{head}…{tail}")
}

/// The next step when the error points at the key itself.
fn hint(error: &Error, var: &str) {
    if matches!(error, Error::Unauthenticated(_) | Error::InvalidApiKey) {
        println!("  check {var}: it must hold the API key `serve --dev` printed for this role");
    }
}
