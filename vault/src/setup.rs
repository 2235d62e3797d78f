//! The data directory: initialising it once, and opening it to serve.
//!
//! ```text
//! ordervault-data/        0700
//!   master.key            0600, 64 hex chars (unless ORDERVAULT_MASTER_KEY is set)
//!   policy.toml           the role policy, edited by the operator
//!   vault.db (+ -wal)     SQLite: ciphertexts, fingerprints, wrapped keys, audit log
//! ```
//!
//! Initialisation writes the master key and policy first and commits
//! everything else in one transaction whose last entry marks the vault as
//! initialised; a directory with some of these files but no mark is a
//! half-initialised one, and `serve` refuses it rather than guess.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use secrecy::SecretString;

use crate::audit::{Action, AuditEvent, Decision};
use crate::crypto::{Algorithm, SecretKey};
use crate::engine::{self, Clock, Engine, EngineConfig, api_key};
use crate::keyring::{self, MASTER_KEY_ENV};
use crate::policy::{DEFAULT_POLICY, Policy};
use crate::store::sqlite::SqliteStore;
use crate::store::{PrincipalRecord, Store, WriteBatch};

/// Master key file name inside the data directory.
pub const MASTER_KEY_FILE: &str = "master.key";
/// Policy file name inside the data directory.
pub const POLICY_FILE: &str = "policy.toml";
/// Database file name inside the data directory.
pub const DB_FILE: &str = "vault.db";
/// Roles that `serve --dev` creates a principal for, named after the role.
pub const DEMO_ROLES: [&str; 6] = ["shop", "courier", "supplier", "support", "auditor", "admin"];

/// Problems with the data directory, each with the next step to take.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SetupError {
    /// Nothing is initialised there yet.
    #[error(
        "{dir} is not an initialised vault: run `ordervault init --data-dir {dir}` (or `ordervault serve --dev` for a development vault)"
    )]
    NotInitialised {
        /// The directory.
        dir: String,
    },
    /// An earlier initialisation stopped part-way.
    #[error(
        "{dir} holds a half-finished initialisation (found {found}); move it aside and run `ordervault init --data-dir {dir}` again"
    )]
    HalfInitialised {
        /// The directory.
        dir: String,
        /// What was found.
        found: String,
    },
    /// `init` on a directory that already holds a vault.
    #[error("{dir} already holds an initialised vault; refusing to overwrite it")]
    AlreadyInitialised {
        /// The directory.
        dir: String,
    },
    /// A file could not be read or written.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The master key is missing, malformed or wrong.
    #[error(transparent)]
    Keyring(#[from] keyring::KeyringError),
    /// The policy file is invalid.
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
    /// The database could not be opened or written.
    #[error("database: {0}")]
    Store(#[from] crate::store::StoreError),
    /// The engine refused to start.
    #[error(transparent)]
    Engine(#[from] crate::error::VaultError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SetupError {
    let what = what.into();
    move |source| SetupError::Io { what, source }
}

/// Where the parts of a vault live.
#[derive(Clone, Debug)]
pub struct Layout {
    /// The data directory.
    pub dir: PathBuf,
}

impl Layout {
    /// The layout of `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Layout {
        Layout { dir: dir.into() }
    }
    /// Path of the master key file.
    pub fn master_key(&self) -> PathBuf {
        self.dir.join(MASTER_KEY_FILE)
    }
    /// Path of the policy file.
    pub fn policy(&self) -> PathBuf {
        self.dir.join(POLICY_FILE)
    }
    /// Path of the database.
    pub fn db(&self) -> PathBuf {
        self.dir.join(DB_FILE)
    }
    fn shown(&self) -> String {
        self.dir.display().to_string()
    }
}

/// What the directory holds.
#[derive(Debug, PartialEq, Eq)]
pub enum DirState {
    /// Missing or empty.
    Empty,
    /// Initialised and complete.
    Initialised,
    /// Some files, no completion mark.
    Partial(String),
}

/// Inspects the data directory without changing it.
pub fn dir_state(layout: &Layout) -> Result<DirState, SetupError> {
    let entries: Vec<String> = match std::fs::read_dir(&layout.dir) {
        Ok(rd) => rd
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(DirState::Empty),
        Err(e) => return Err(io(format!("cannot read {}", layout.shown()))(e)),
    };
    if entries.is_empty() {
        return Ok(DirState::Empty);
    }
    let found = {
        let mut v = entries.clone();
        v.sort();
        v.join(", ")
    };
    if !layout.db().exists() {
        return Ok(DirState::Partial(found));
    }
    let conn = rusqlite::Connection::open_with_flags(
        layout.db(),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    );
    let marked = conn
        .and_then(|c| {
            c.query_row(
                "SELECT value FROM meta WHERE key = ?1",
                [engine::META_INITIALIZED],
                |r| r.get::<_, Vec<u8>>(0),
            )
        })
        .map(|v| v == b"1")
        .unwrap_or(false);
    Ok(if marked {
        DirState::Initialised
    } else {
        DirState::Partial(found)
    })
}

fn write_new(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, mode);
    let mut f = opts.open(path)?;
    f.write_all(contents)?;
    f.sync_all()
}

/// An API key created at initialisation, shown once.
pub struct CreatedPrincipal {
    /// Principal name.
    pub name: String,
    /// Its role.
    pub role: String,
    /// The API key; only its hash is stored.
    pub api_key: SecretString,
}

impl std::fmt::Debug for CreatedPrincipal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedPrincipal")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("api_key", &"[redacted]")
            .finish()
    }
}

/// Initialises an empty data directory: master key, policy, first data-key
/// version, fingerprint key, and a principal per role in `roles`.
pub async fn init(
    layout: &Layout,
    roles: &[&str],
    chain: &str,
    clock: &dyn Clock,
) -> Result<Vec<CreatedPrincipal>, SetupError> {
    match dir_state(layout)? {
        DirState::Empty => {}
        DirState::Initialised => {
            return Err(SetupError::AlreadyInitialised {
                dir: layout.shown(),
            });
        }
        DirState::Partial(found) => {
            return Err(SetupError::HalfInitialised {
                dir: layout.shown(),
                found,
            });
        }
    }
    std::fs::create_dir_all(&layout.dir)
        .map_err(io(format!("cannot create {}", layout.shown())))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&layout.dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io(format!("cannot restrict {}", layout.shown())))?;
    }
    let master = if std::env::var_os(MASTER_KEY_ENV).is_some() {
        keyring::load_master_key(&layout.master_key())?
    } else {
        let key = SecretKey::generate();
        let mut text = key.to_hex();
        text.push('\n');
        write_new(&layout.master_key(), text.as_bytes(), 0o600).map_err(io(format!(
            "cannot write {}",
            layout.master_key().display()
        )))?;
        key
    };
    write_new(&layout.policy(), DEFAULT_POLICY.as_bytes(), 0o644)
        .map_err(io(format!("cannot write {}", layout.policy().display())))?;
    let policy = Policy::parse(DEFAULT_POLICY)?;

    let now = clock.now_ms();
    let kek = keyring::kek(&master);
    let mut batch = WriteBatch {
        keys: vec![keyring::new_data_key(
            &kek,
            1,
            Algorithm::Aes256Gcm,
            keyring::state::PRIMARY,
            now,
        )],
        meta: vec![(
            engine::META_FINGERPRINT_ROOT.into(),
            keyring::new_fingerprint_root(&kek),
        )],
        audit_chain: chain.to_owned(),
        ..Default::default()
    };
    let mut policy_hash = policy.hash_hex();
    policy_hash.truncate(16);
    let rid = hex::encode(crate::crypto::random_bytes::<8>());
    let mut ev = AuditEvent::new(
        now,
        "",
        "",
        Action::Admin,
        Decision::Allowed,
        &rid,
        &policy_hash,
    );
    ev.reason = Some("init".into());
    ev.key_version = Some(1);
    batch.audit.push(ev);
    let mut created = Vec::new();
    for role in roles {
        let (key, hash) = api_key::generate();
        batch.principals.push(PrincipalRecord {
            name: (*role).to_owned(),
            role: (*role).to_owned(),
            key_hash: hash,
            created_ms: now,
            revoked_ms: None,
        });
        let mut ev = AuditEvent::new(
            now,
            "",
            "",
            Action::Admin,
            Decision::Allowed,
            &rid,
            &policy_hash,
        );
        ev.reason = Some(format!("principal_created name={role} role={role}"));
        batch.audit.push(ev);
        created.push(CreatedPrincipal {
            name: (*role).to_owned(),
            role: (*role).to_owned(),
            api_key: key,
        });
    }
    // Last, in the same transaction: the vault is complete.
    batch
        .meta
        .push((engine::META_INITIALIZED.into(), b"1".to_vec()));
    let store = SqliteStore::open(&layout.db())?;
    store.commit(batch).await?;
    store.close();
    Ok(created)
}

/// Opens an initialised data directory into a running engine.
pub async fn open(
    layout: &Layout,
    clock: Arc<dyn Clock>,
    config: EngineConfig,
) -> Result<(Arc<Engine>, Arc<SqliteStore>), SetupError> {
    match dir_state(layout)? {
        DirState::Initialised => {}
        DirState::Empty => {
            return Err(SetupError::NotInitialised {
                dir: layout.shown(),
            });
        }
        DirState::Partial(found) => {
            return Err(SetupError::HalfInitialised {
                dir: layout.shown(),
                found,
            });
        }
    }
    let master = keyring::load_master_key(&layout.master_key())?;
    let policy = Policy::load(&layout.policy())?;
    let mut config = config;
    config.policy_path.get_or_insert_with(|| layout.policy());
    let store = Arc::new(SqliteStore::open(&layout.db())?);
    let engine = Engine::load(store.clone(), &master, policy, clock, config).await?;
    Ok((Arc::new(engine), store))
}
