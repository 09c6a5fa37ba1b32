//! Where the SQL registry lives: the database type, the connection settings (flags and
//! `--registry_db_url`, parsed without ever printing the password) and how they are shown.

use std::time::Duration;

/// Supported database servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbType {
    /// MySQL or MariaDB.
    Mysql,
    /// PostgreSQL.
    Postgresql,
}

impl DbType {
    /// Parses `--registry_db_type` (also URL schemes): mysql, mariadb, postgresql, postgres.
    pub fn parse(s: &str) -> Option<DbType> {
        match s.trim().to_ascii_lowercase().as_str() {
            "mysql" | "mariadb" => Some(DbType::Mysql),
            "postgresql" | "postgres" | "pg" => Some(DbType::Postgresql),
            _ => None,
        }
    }

    pub fn default_port(self) -> u16 {
        match self {
            DbType::Mysql => 3306,
            DbType::Postgresql => 5432,
        }
    }

    pub(super) fn scheme(self) -> &'static str {
        match self {
            DbType::Mysql => "mysql",
            DbType::Postgresql => "postgresql",
        }
    }
}

/// A password that never prints.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"***\"")
    }
}

/// Errors in the connection settings (a bad `--registry_db_url`).
#[derive(Debug, thiserror::Error)]
pub enum SqlConfigError {
    #[error(
        "--registry_db_url must look like mysql://user:password@host:port/database or postgresql://…: {0}"
    )]
    BadUrl(String),
}

/// Where the SQL registry lives.
#[derive(Debug, Clone, PartialEq)]
pub struct SqlConfig {
    pub db_type: DbType,
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Secret,
    pub database: String,
    /// Connections per controller.
    pub pool_size: u32,
    /// How long start-up keeps retrying an unreachable database (zero: fail at once).
    pub wait: Duration,
}

fn percent_decode(s: &str) -> Result<String, SqlConfigError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| SqlConfigError::BadUrl("bad %-escape".into()))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| SqlConfigError::BadUrl("not UTF-8 after %-decoding".into()))
}

impl SqlConfig {
    /// Parses `scheme://[user[:password]@]host[:port][/database]`; missing parts keep the
    /// values of `self` (the other flags).
    pub fn apply_url(mut self, url: &str) -> Result<SqlConfig, SqlConfigError> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| SqlConfigError::BadUrl("missing scheme://".into()))?;
        self.db_type = DbType::parse(scheme)
            .ok_or_else(|| SqlConfigError::BadUrl(format!("unknown scheme {scheme:?}")))?;
        let rest = rest.split(['?', '#']).next().unwrap_or_default();
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        if let Some(u) = userinfo {
            let (user, pass) = match u.split_once(':') {
                Some((a, b)) => (a, Some(b)),
                None => (u, None),
            };
            if !user.is_empty() {
                self.user = percent_decode(user)?;
            }
            if let Some(p) = pass {
                self.password = Secret(percent_decode(p)?);
            }
        }
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| SqlConfigError::BadUrl("unclosed [".into()))?;
            (h, after.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        if host.is_empty() {
            return Err(SqlConfigError::BadUrl("missing host".into()));
        }
        self.host = host.to_string();
        self.port = match port {
            Some(p) => p
                .parse()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| SqlConfigError::BadUrl(format!("bad port {p:?}")))?,
            None => self.db_type.default_port(),
        };
        if !path.is_empty() {
            self.database = percent_decode(path)?;
        }
        Ok(self)
    }

    /// `mysql://user@host:port/database` — never the password.
    pub fn describe(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        format!(
            "{}://{}@{}:{}/{}",
            self.db_type.scheme(),
            self.user,
            host,
            self.port,
            self.database
        )
    }
}
