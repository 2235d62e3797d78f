//! Role policy: for each role, which purposes it may state, what it may see
//! of each field kind, and what else it may do.
//!
//! The policy is parsed and validated once (at start or reload) into an
//! immutable [`Policy`]; decisions are pure lookups on it. Its SHA-256 goes
//! into every audit event, so an auditor can tell which rules were in force.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use serde::Deserialize;

use crate::crypto;
use crate::kinds::FieldKind;

/// The default e-commerce policy written by `ordervault init`.
pub const DEFAULT_POLICY: &str = include_str!("../policy/default.toml");

/// What a role sees of one field kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Visibility {
    /// The value in full.
    Plain,
    /// The kind's display mask.
    Masked,
    /// Nothing: an explicit per-field denial.
    Deny,
}

impl Visibility {
    /// Name used in policy files and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Visibility::Plain => "plain",
            Visibility::Masked => "masked",
            Visibility::Deny => "deny",
        }
    }
}

/// Something a role may do besides revealing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Permission {
    /// Tokenize values and orders.
    Tokenize,
    /// Grant and revoke access to orders.
    Grant,
    /// Query and verify the audit log.
    Audit,
    /// Administer keys, principals and policy.
    Admin,
}

impl Permission {
    /// Name used in policy files.
    pub fn as_str(self) -> &'static str {
        match self {
            Permission::Tokenize => "tokenize",
            Permission::Grant => "grant",
            Permission::Audit => "audit",
            Permission::Admin => "admin",
        }
    }
}

/// A stated reason for a reveal: lowercase letters, digits and `_`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Purpose(String);

impl Purpose {
    /// Parses a purpose name; `None` when it is not a well-formed name.
    pub fn parse(s: &str) -> Option<Purpose> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        ok.then(|| Purpose(s.to_owned()))
    }

    /// The purpose name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Purpose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A rate limit: at most `count` reveals per `window_ms`, as a token bucket
/// (the bucket holds `count` and refills continuously).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    /// Reveals per window (the burst size).
    pub count: u32,
    /// The window in milliseconds.
    pub window_ms: u64,
}

impl Rate {
    /// Parses `"600/min"`, `"10/s"`, `"5000/h"` or `"20000/day"`.
    pub fn parse(s: &str) -> Option<Rate> {
        let (n, unit) = s.trim().split_once('/')?;
        let count: u32 = n.trim().parse().ok().filter(|n| *n > 0)?;
        let window_ms = match unit.trim() {
            "s" | "sec" | "second" => 1_000,
            "min" | "minute" => 60_000,
            "h" | "hour" => 3_600_000,
            "day" | "d" => 86_400_000,
            _ => return None,
        };
        Some(Rate { count, window_ms })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.window_ms {
            1_000 => "s",
            60_000 => "min",
            3_600_000 => "h",
            _ => "day",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

/// The reveal limits that apply to one principal.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Reveal rate, if limited.
    pub rate: Option<Rate>,
    /// Distinct orders revealed per UTC day, if capped.
    pub daily_distinct_orders: Option<u64>,
}

/// One role's rules.
#[derive(Clone, Debug)]
pub struct RolePolicy {
    name: String,
    permissions: BTreeSet<Permission>,
    purposes: BTreeSet<Purpose>,
    reveal: [Visibility; 8],
    requires_grant: bool,
    limits: Limits,
}

impl RolePolicy {
    /// The role's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the role may state `purpose`.
    pub fn allows_purpose(&self, purpose: &Purpose) -> bool {
        self.purposes.contains(purpose)
    }

    /// What the role sees of `kind`.
    pub fn visibility(&self, kind: FieldKind) -> Visibility {
        self.reveal[usize::from(kind.code() - 1)]
    }

    /// Whether the role has `permission`.
    pub fn has(&self, permission: Permission) -> bool {
        self.permissions.contains(&permission)
    }

    /// Purposes the role may state.
    pub fn purposes(&self) -> impl Iterator<Item = &Purpose> {
        self.purposes.iter()
    }

    /// Whether the role may reveal an order's fields only under a live grant.
    pub fn requires_grant(&self) -> bool {
        self.requires_grant
    }

    /// The role's own limits (before per-principal overrides).
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Permissions of the role.
    pub fn permissions(&self) -> impl Iterator<Item = &Permission> {
        self.permissions.iter()
    }
}

/// A validated policy.
#[derive(Clone, Debug)]
pub struct Policy {
    roles: BTreeMap<String, RolePolicy>,
    purposes: BTreeSet<Purpose>,
    deterministic: [bool; 8],
    overrides: BTreeMap<String, Limits>,
    hash: [u8; 32],
}

/// Why a policy file was rejected. Names the place, never a secret.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The file could not be read.
    #[error("cannot read policy file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown or missing keys.
    #[error("policy is not valid: {0}")]
    Syntax(String),
    /// The file is well-formed but its rules are inconsistent.
    #[error("policy is not valid: {0}")]
    Invalid(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    purposes: BTreeMap<String, String>,
    #[serde(default)]
    kinds: KindsSection,
    roles: BTreeMap<String, RoleFile>,
    #[serde(default)]
    principals: BTreeMap<String, LimitsFile>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    rate: Option<String>,
    daily_distinct_orders: Option<u64>,
}

fn parse_limits(file: &LimitsFile, at: &str) -> Result<Limits, PolicyError> {
    let rate = match &file.rate {
        None => None,
        Some(r) => Some(Rate::parse(r).ok_or_else(|| {
            PolicyError::Invalid(format!(
                "{at}.rate: {r:?} is not a rate like \"600/min\" (units s, min, h, day)"
            ))
        })?),
    };
    if file.daily_distinct_orders == Some(0) {
        return Err(PolicyError::Invalid(format!(
            "{at}.daily_distinct_orders: 0 would deny every reveal; use reveal = {{}} instead"
        )));
    }
    Ok(Limits {
        rate,
        daily_distinct_orders: file.daily_distinct_orders,
    })
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct KindsSection {
    #[serde(default)]
    deterministic: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoleFile {
    #[serde(default)]
    permissions: Vec<Permission>,
    #[serde(default)]
    purposes: Vec<String>,
    #[serde(default)]
    reveal: BTreeMap<String, Visibility>,
    #[serde(default)]
    requires_grant: bool,
    #[serde(flatten)]
    limits: LimitsFile,
}

fn parse_kind(name: &str, at: &str) -> Result<FieldKind, PolicyError> {
    name.parse()
        .map_err(|_| PolicyError::Invalid(format!("{at}: unknown field kind {name:?}")))
}

impl Policy {
    /// Parses and validates a policy from TOML text.
    pub fn parse(text: &str) -> Result<Policy, PolicyError> {
        let file: PolicyFile =
            toml::from_str(text).map_err(|e| PolicyError::Syntax(e.to_string()))?;
        let mut purposes = BTreeSet::new();
        for name in file.purposes.keys() {
            let p = Purpose::parse(name).ok_or_else(|| {
                PolicyError::Invalid(format!(
                    "purpose {name:?} is not a valid name (lowercase letters, digits and _)"
                ))
            })?;
            purposes.insert(p);
        }
        let mut deterministic = [false; 8];
        for name in &file.kinds.deterministic {
            let kind = parse_kind(name, "kinds.deterministic")?;
            deterministic[usize::from(kind.code() - 1)] = true;
        }
        if file.roles.is_empty() {
            return Err(PolicyError::Invalid("no roles defined".into()));
        }
        let mut roles = BTreeMap::new();
        for (name, role) in file.roles {
            if Purpose::parse(&name).is_none() {
                return Err(PolicyError::Invalid(format!(
                    "role name {name:?} is not valid (lowercase letters, digits and _)"
                )));
            }
            let mut role_purposes = BTreeSet::new();
            for p in &role.purposes {
                let purpose = Purpose::parse(p)
                    .filter(|p| purposes.contains(p))
                    .ok_or_else(|| {
                        PolicyError::Invalid(format!(
                            "roles.{name}.purposes: {p:?} is not listed under [purposes]"
                        ))
                    })?;
                role_purposes.insert(purpose);
            }
            let mut reveal = [Visibility::Deny; 8];
            for (kind, vis) in &role.reveal {
                let kind = parse_kind(kind, &format!("roles.{name}.reveal"))?;
                reveal[usize::from(kind.code() - 1)] = *vis;
            }
            let limits = parse_limits(&role.limits, &format!("roles.{name}"))?;
            roles.insert(
                name.clone(),
                RolePolicy {
                    name,
                    permissions: role.permissions.into_iter().collect(),
                    purposes: role_purposes,
                    reveal,
                    requires_grant: role.requires_grant,
                    limits,
                },
            );
        }
        let mut overrides = BTreeMap::new();
        for (name, file) in &file.principals {
            overrides.insert(
                name.clone(),
                parse_limits(file, &format!("principals.{name}"))?,
            );
        }
        Ok(Policy {
            roles,
            purposes,
            deterministic,
            overrides,
            hash: crypto::sha256(text.as_bytes()),
        })
    }

    /// Reads and validates a policy file.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Policy::parse(&text)
    }

    /// The rules of `role`, if the policy defines it.
    pub fn role(&self, role: &str) -> Option<&RolePolicy> {
        self.roles.get(role)
    }

    /// All roles, by name.
    pub fn roles(&self) -> impl Iterator<Item = &RolePolicy> {
        self.roles.values()
    }

    /// The limits for `principal` in `role`: the role's, with the
    /// principal's overrides on top.
    pub fn limits(&self, principal: &str, role: &RolePolicy) -> Limits {
        let base = role.limits;
        match self.overrides.get(principal) {
            None => base,
            Some(o) => Limits {
                rate: o.rate.or(base.rate),
                daily_distinct_orders: o.daily_distinct_orders.or(base.daily_distinct_orders),
            },
        }
    }

    /// Whether `kind` gets deterministic tokens.
    pub fn is_deterministic(&self, kind: FieldKind) -> bool {
        self.deterministic[usize::from(kind.code() - 1)]
    }

    /// Whether `purpose` is defined at all.
    pub fn knows_purpose(&self, purpose: &Purpose) -> bool {
        self.purposes.contains(purpose)
    }

    /// SHA-256 of the policy text, as lowercase hex (first 16 chars are
    /// shown in audit events).
    pub fn hash_hex(&self) -> String {
        hex::encode(self.hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default() -> Policy {
        Policy::parse(DEFAULT_POLICY).expect("default policy is valid")
    }

    #[test]
    fn default_policy_matches_the_product_story() {
        let p = default();
        let courier = p.role("courier").expect("courier");
        assert_eq!(courier.visibility(FieldKind::Phone), Visibility::Plain);
        assert_eq!(courier.visibility(FieldKind::Address), Visibility::Plain);
        assert_eq!(courier.visibility(FieldKind::Name), Visibility::Masked);
        assert_eq!(courier.visibility(FieldKind::IdNumber), Visibility::Deny);
        let supplier = p.role("supplier").expect("supplier");
        for kind in [
            FieldKind::Name,
            FieldKind::Phone,
            FieldKind::Address,
            FieldKind::IdNumber,
            FieldKind::Email,
            FieldKind::CustomerId,
        ] {
            assert_eq!(supplier.visibility(kind), Visibility::Deny, "{kind}");
        }
        assert_eq!(
            supplier.visibility(FieldKind::OrderDetails),
            Visibility::Plain
        );
        let support = p.role("support").expect("support");
        assert_eq!(support.visibility(FieldKind::Phone), Visibility::Masked);
        assert_eq!(
            support.visibility(FieldKind::OrderDetails),
            Visibility::Plain
        );
        let auditor = p.role("auditor").expect("auditor");
        assert!(
            FieldKind::ALL
                .iter()
                .all(|k| auditor.visibility(*k) == Visibility::Deny)
        );
        assert!(p.role("shop").expect("shop").has(Permission::Tokenize));
        assert!(!courier.has(Permission::Tokenize));
        assert!(p.is_deterministic(FieldKind::Phone));
        assert!(!p.is_deterministic(FieldKind::Address));
    }

    #[test]
    fn rejects_inconsistent_policies() {
        let cases = [
            ("[purposes]\n[roles.a]\npurposes=[\"x\"]\n", "not listed"),
            (
                "[purposes]\nx=\"\"\n[roles.a]\nreveal={ shoe = \"plain\" }\n",
                "unknown field kind",
            ),
            (
                "[purposes]\nx=\"\"\n[roles.a]\nreveal={ name = \"visible\" }\n",
                "visible",
            ),
            (
                "[purposes]\nx=\"\"\n[roles.a]\npermissions=[\"root\"]\n",
                "root",
            ),
            ("[purposes]\nx=\"\"\n[roles.a]\ncolour=1\n", "colour"),
            ("[purposes]\nx=\"\"\n[roles]\n", "no roles"),
            (
                "[purposes]\n\"Bad Name\"=\"\"\n[roles.a]\n",
                "not a valid name",
            ),
        ];
        for (text, needle) in cases {
            let err = Policy::parse(text).expect_err(text).to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn limits_parse_and_principal_overrides_win() {
        let text = r#"
            [purposes]
            delivery = ""
            [roles.courier]
            purposes = ["delivery"]
            requires_grant = true
            rate = "600/min"
            daily_distinct_orders = 2000
            [principals.courier-7]
            daily_distinct_orders = 50
        "#;
        let p = Policy::parse(text).expect("valid");
        let role = p.role("courier").expect("courier");
        assert!(role.requires_grant());
        assert_eq!(
            p.limits("courier-1", role),
            Limits {
                rate: Some(Rate {
                    count: 600,
                    window_ms: 60_000
                }),
                daily_distinct_orders: Some(2000)
            }
        );
        assert_eq!(p.limits("courier-7", role).daily_distinct_orders, Some(50));
        assert_eq!(
            p.limits("courier-7", role).rate,
            Some(Rate {
                count: 600,
                window_ms: 60_000
            })
        );
        for bad in ["600", "0/min", "10/week", "x/s"] {
            assert!(Rate::parse(bad).is_none(), "{bad}");
        }
        let bad = text.replace("\"600/min\"", "\"600 per minute\"");
        assert!(
            Policy::parse(&bad)
                .expect_err("bad rate")
                .to_string()
                .contains("roles.courier.rate")
        );
    }

    #[test]
    fn purpose_names_are_strict() {
        assert!(Purpose::parse("delivery").is_some());
        for bad in ["", "Delivery", "de livery", "x;y", &"a".repeat(65)] {
            assert!(Purpose::parse(bad).is_none(), "{bad:?}");
        }
    }
}
