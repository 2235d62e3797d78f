//! The `ordervault.v1` gRPC API: generated messages, clients and servers,
//! shared by the vault and the SDK.
//!
//! Messages that can carry a plaintext value (`Field`, `Consignee`,
//! `LineItem`, `RevealedField`) have a hand-written `Debug` that prints
//! `[redacted]` in place of values, so a stray `{:?}` never logs one.

#![allow(missing_docs)] // Generated code carries the .proto comments.

pub mod codec;

/// Package `ordervault.v1`.
pub mod v1 {
    #![allow(clippy::all, clippy::pedantic, rust_2018_idioms)]
    tonic::include_proto!("ordervault.v1");

    /// Encoded `FileDescriptorSet` of the package, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/ordervault_descriptor.bin"));
}

use std::fmt;

const REDACTED: &str = "[redacted]";

impl fmt::Debug for v1::Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Field")
            .field("kind", &self.kind)
            .field("value", &REDACTED)
            .finish()
    }
}

impl fmt::Debug for v1::Consignee {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consignee").finish_non_exhaustive()
    }
}

impl fmt::Debug for v1::LineItem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LineItem")
            .field("sku", &self.sku)
            .field("quantity", &self.quantity)
            .field("currency", &self.currency)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for v1::RevealedField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RevealedField")
            .field("token", &self.token)
            .field("kind", &self.kind)
            .field("disclosure", &self.disclosure)
            .field("value", &REDACTED)
            .field("denial_reason", &self.denial_reason)
            .finish()
    }
}

impl fmt::Debug for v1::LeakedRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeakedRecord")
            .field("columns", &self.fields.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for v1::CreatePrincipalResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreatePrincipalResponse")
            .field("principal", &self.principal)
            .field("api_key", &REDACTED)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::v1;

    #[test]
    fn debug_never_prints_values() {
        let field = v1::Field {
            kind: v1::FieldKind::Phone as i32,
            value: "13812345678".into(),
        };
        let order = v1::Order {
            order_number: "SO-1".into(),
            customer_id: "c-9".into(),
            consignee: Some(v1::Consignee {
                name: "张小明".into(),
                phone: "13812345678".into(),
                address: "浙江省杭州市西湖区文三路1号".into(),
                id_number: String::new(),
                email: "zxm@example.com".into(),
            }),
            items: vec![v1::LineItem {
                sku: "SKU-1".into(),
                title: "secret title".into(),
                quantity: 2,
                unit_price: "199.00".into(),
                currency: "CNY".into(),
            }],
            placed_at: None,
        };
        let revealed = v1::RevealedField {
            token: "ph_x".into(),
            kind: 2,
            disclosure: 1,
            value: "13812345678".into(),
            denial_reason: String::new(),
        };
        let printed = format!("{field:?} {order:?} {revealed:?}");
        for value in [
            "13812345678",
            "张小明",
            "文三路",
            "zxm@",
            "secret title",
            "199.00",
        ] {
            assert!(!printed.contains(value), "{value} leaked into {printed}");
        }
        assert!(printed.contains("SKU-1"));
    }
}
