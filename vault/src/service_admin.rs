//! `AdminService`: the operator's RPCs. Thin, like [`crate::service`]:
//! authenticate, call the engine ([`crate::admin`]), render the reply. The
//! engine checks the `admin` permission and audits.

use std::sync::Arc;

use ordervault_proto::v1;
use ordervault_proto::v1::admin_service_server::AdminService;
use secrecy::ExposeSecret;
use tonic::{Request, Response, Status};

use crate::admin::KeyStatus;
use crate::engine::Engine;
use crate::service::{authenticate, status as to_status, timestamp};
use crate::store::PrincipalRecord;

/// `AdminService`.
#[derive(Debug, Clone)]
pub struct AdminApi {
    engine: Arc<Engine>,
}

impl AdminApi {
    /// Serves `engine`.
    pub fn new(engine: Arc<Engine>) -> AdminApi {
        AdminApi { engine }
    }
}

fn key_info(k: &KeyStatus) -> v1::KeyInfo {
    v1::KeyInfo {
        version: k.version,
        algorithm: k.algorithm.as_str().to_owned(),
        state: k.state.clone(),
        created_at: Some(timestamp(k.created_ms)),
        ciphertexts: k.ciphertexts,
        encryptions: k.encryptions,
        encryption_cap: k.encryption_cap.unwrap_or(0),
    }
}

fn principal_info(p: &PrincipalRecord) -> v1::PrincipalInfo {
    v1::PrincipalInfo {
        name: p.name.clone(),
        role: p.role.clone(),
        created_at: Some(timestamp(p.created_ms)),
        revoked_at: p.revoked_ms.map(timestamp),
    }
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn status(
        &self,
        req: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusResponse>, Status> {
        let actor = authenticate(&self.engine, &req)?;
        let s = self.engine.status(&actor).await.map_err(to_status)?;
        Ok(Response::new(v1::StatusResponse {
            version: s.version.to_owned(),
            storage_backend: s.storage_backend.to_owned(),
            storage_bytes: s.storage_bytes,
            keys: s.keys.iter().map(key_info).collect(),
            tokens: s.tokens,
            chain: s.chain,
            audit_size: s.audit_size,
            audit_head: s.audit_head,
            uptime_seconds: s.uptime_ms / 1000,
            policy_hash: s.policy_hash,
        }))
    }

    async fn list_keys(
        &self,
        req: Request<v1::ListKeysRequest>,
    ) -> Result<Response<v1::ListKeysResponse>, Status> {
        let actor = authenticate(&self.engine, &req)?;
        let keys = self.engine.list_keys(&actor).await.map_err(to_status)?;
        Ok(Response::new(v1::ListKeysResponse {
            keys: keys.iter().map(key_info).collect(),
        }))
    }

    async fn rotate_key(
        &self,
        req: Request<v1::RotateKeyRequest>,
    ) -> Result<Response<v1::RotateKeyResponse>, Status> {
        let actor = authenticate(&self.engine, &req)?;
        let key = self
            .engine
            .rotate_key(&actor, &req.get_ref().algorithm)
            .await
            .map_err(to_status)?;
        Ok(Response::new(v1::RotateKeyResponse {
            key: Some(key_info(&key)),
        }))
    }

    async fn rewrap(
        &self,
        req: Request<v1::RewrapRequest>,
    ) -> Result<Response<v1::RewrapResponse>, Status> {
        let actor = authenticate(&self.engine, &req)?;
        let m = req.get_ref();
        let p = self
            .engine
            .rewrap(&actor, m.from_version, m.batch)
            .await
            .map_err(to_status)?;
        Ok(Response::new(v1::RewrapResponse {
            rewrapped: p.rewrapped,
            remaining: p.remaining,
            primary_version: p.primary,
        }))
    }

    async fn retire_key(
        &self,
        req: Request<v1::RetireKeyRequest>,
    ) -> Result<Response<v1::RetireKeyResponse>, Status> {
        let actor = authenticate(&self.engine, &req)?;
        let key = self
            .engine
            .retire_key(&actor, req.get_ref().version)
            .await
            .map_err(to_status)?;
        Ok(Response::new(v1::RetireKeyResponse {
            key: Some(key_info(&key)),
        }))
    }

    async fn create_principal(
        &self,
        req: Request<v1::CreatePrincipalRequest>,
    ) -> Result<Response<v1::CreatePrincipalResponse>, Status> {
        let actor = authenticate(&self.engine, &req)?;
        let m = req.get_ref();
        let (record, key) = self
            .engine
            .create_principal(&actor, &m.name, &m.role)
            .await
            .map_err(to_status)?;
        Ok(Response::new(v1::CreatePrincipalResponse {
            principal: Some(principal_info(&record)),
            api_key: key.expose_secret().to_owned(),
        }))
    }

    async fn list_principals(
        &self,
        req: Request<v1::ListPrincipalsRequest>,
    ) -> Result<Response<v1::ListPrincipalsResponse>, Status> {
        let actor = authenticate(&self.engine, &req)?;
        let principals = self
            .engine
            .list_principals(&actor)
            .await
            .map_err(to_status)?;
        Ok(Response::new(v1::ListPrincipalsResponse {
            principals: principals.iter().map(principal_info).collect(),
        }))
    }

    async fn revoke_principal(
        &self,
        req: Request<v1::RevokePrincipalRequest>,
    ) -> Result<Response<v1::RevokePrincipalResponse>, Status> {
        let actor = authenticate(&self.engine, &req)?;
        let record = self
            .engine
            .revoke_principal(&actor, &req.get_ref().name)
            .await
            .map_err(to_status)?;
        Ok(Response::new(v1::RevokePrincipalResponse {
            principal: Some(principal_info(&record)),
        }))
    }

    async fn reload_policy(
        &self,
        req: Request<v1::ReloadPolicyRequest>,
    ) -> Result<Response<v1::ReloadPolicyResponse>, Status> {
        let actor = authenticate(&self.engine, &req)?;
        let r = self.engine.reload_policy(&actor).await.map_err(to_status)?;
        Ok(Response::new(v1::ReloadPolicyResponse {
            policy_hash: r.policy_hash,
            roles: r.roles,
        }))
    }
}
