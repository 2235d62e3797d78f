//! Grants: "principal P may reveal order O for purpose X until time T".

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ordervault_proto::v1 as pb;

use crate::{Error, Token};

/// A grant, as the vault reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Id to revoke it with (`gr_...`).
    pub id: String,
    /// Who may reveal.
    pub principal: String,
    /// Which order.
    pub order_token: Token,
    /// For which purpose.
    pub purpose: String,
    /// Until when.
    pub expires_at: SystemTime,
    /// Who granted it.
    pub granted_by: String,
    /// When.
    pub created_at: SystemTime,
    /// When it was revoked, if it was.
    pub revoked_at: Option<SystemTime>,
}

impl Grant {
    /// Whether the grant allows reveals at `now`.
    pub fn is_live(&self, now: SystemTime) -> bool {
        self.revoked_at.is_none() && self.expires_at > now
    }
}

fn time(ts: Option<prost_types::Timestamp>) -> Option<SystemTime> {
    let ts = ts?;
    let secs = u64::try_from(ts.seconds).ok()?;
    let nanos = u32::try_from(ts.nanos).ok()?;
    Some(UNIX_EPOCH + Duration::new(secs, nanos))
}

pub(crate) fn grant_from_wire(g: Option<pb::GrantInfo>) -> Result<Grant, Error> {
    let g = g.ok_or_else(|| Error::Protocol("the reply carries no grant".into()))?;
    let missing = |what: &str| Error::Protocol(format!("the grant in the reply has no {what}"));
    Ok(Grant {
        expires_at: time(g.expires_at).ok_or_else(|| missing("expiry"))?,
        created_at: time(g.created_at).ok_or_else(|| missing("creation time"))?,
        revoked_at: time(g.revoked_at),
        id: g.grant_id,
        principal: g.principal,
        order_token: Token::from(g.order_token),
        purpose: g.purpose,
        granted_by: g.granted_by,
    })
}
