//! Kerberos for the Negotiate proxy scheme, client side, through MIT Kerberos's GSSAPI (the
//! `libgssapi` crate); the only module that touches it. MIT Kerberos reads the keytab, finds
//! the realm's KDCs (krb5.conf or DNS) and fetches tickets again before they expire; this
//! module chooses the keytab and the names, and says in words what went wrong.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use libgssapi::context::{ClientCtx, CtxFlags};
use libgssapi::credential::{Cred, CredUsage};
use libgssapi::name::Name;
use libgssapi::oid::{OidSet, GSS_MECH_KRB5, GSS_MECH_SPNEGO, GSS_NT_KRB5_PRINCIPAL};

/// Where the agent's Kerberos identity comes from, and which principal the proxy has.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KerberosLogin {
    /// `agent.proxy_keytab`; without it, `KRB5_CLIENT_KTNAME` from the environment.
    pub keytab: Option<PathBuf>,
    /// `agent.proxy_principal`: the client principal; without it, the keytab's first entry.
    pub principal: Option<String>,
    /// `agent.proxy_spn`: the proxy's service principal; without it, `HTTP/<proxy host>`.
    pub spn: Option<String>,
}

impl KerberosLogin {
    /// The keytab to use: the configured one, else `KRB5_CLIENT_KTNAME` (its `FILE:` prefix
    /// dropped).
    pub fn keytab(&self) -> Option<PathBuf> {
        self.keytab.clone().or_else(|| {
            let name = std::env::var("KRB5_CLIENT_KTNAME").ok()?;
            let path = name.strip_prefix("FILE:").unwrap_or(&name);
            (!path.is_empty()).then(|| PathBuf::from(path))
        })
    }

    /// Whether Kerberos can answer a Negotiate challenge: with a keytab, or with a credential
    /// cache an operator keeps filled (`KRB5CCNAME`, for example by `k5start`).
    pub fn available(&self) -> bool {
        self.keytab().is_some() || std::env::var_os("KRB5CCNAME").is_some_and(|v| !v.is_empty())
    }

    /// The proxy's service principal: `agent.proxy_spn`, else `HTTP/` and the proxy's host
    /// as configured (not canonicalized through DNS).
    pub fn spn(&self, proxy_host: &str) -> String {
        match &self.spn {
            Some(spn) => spn.clone(),
            None => format!("HTTP/{proxy_host}"),
        }
    }
}

/// The first token of a Negotiate handshake, and the names it was made with.
#[derive(Debug)]
pub struct Token {
    /// The SPNEGO token (a Kerberos AP-REQ inside) for `Proxy-Authorization: Negotiate`.
    pub token: Vec<u8>,
    /// The client principal, `user@REALM`.
    pub client: String,
    /// The service principal asked for.
    pub spn: String,
}

/// What went wrong, in words an operator can act on; never a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KerberosError {
    /// The keytab cannot be read.
    #[error("cannot read the keytab {path}: {detail}")]
    Keytab {
        /// The keytab.
        path: String,
        /// Why.
        detail: String,
    },
    /// Neither a keytab nor a credential cache gave a principal.
    #[error("no Kerberos key or ticket for the agent: {where_}; set agent.proxy_keytab to a keytab that holds the agent's service account")]
    NoKeys {
        /// Where relay looked.
        where_: String,
    },
    /// The keytab holds no key for the configured principal.
    #[error(
        "the keytab {keytab} holds no key for {principal} (agent.proxy_principal); list it with `klist -k {keytab}`"
    )]
    NoKeyFor {
        /// The keytab.
        keytab: String,
        /// The principal asked for.
        principal: String,
    },
    /// The KDC does not know the agent's principal.
    #[error("the KDC does not know the agent's principal {principal}: check the account's name and realm")]
    ClientUnknown {
        /// The client principal.
        principal: String,
    },
    /// The KDC does not know the proxy's principal.
    #[error("the KDC does not know the proxy's principal {spn}: Active Directory registers HTTP/ and the proxy's full host name, so use that name in the proxy URL or set agent.proxy_spn")]
    ServerUnknown {
        /// The service principal asked for.
        spn: String,
    },
    /// The KDC refused the keytab's key: the keytab is older than the account's key.
    #[error("the KDC did not accept the keytab's key for {principal} (a keytab older than the account's password or key): export it again; relay does not try this keytab again until it changes, so that the domain does not lock the account out")]
    KeyRefused {
        /// The client principal.
        principal: String,
    },
    /// The keytab's key was refused before and the keytab has not changed since.
    #[error("the KDC refused the keytab's key for {principal} earlier; relay does not try that keytab again, so that the domain does not lock the account out: replace {keytab} (read again at the next try)")]
    Held {
        /// The client principal.
        principal: String,
        /// The keytab.
        keytab: String,
    },
    /// No KDC of the realm answered.
    #[error("no KDC of realm {realm} could be reached (from krb5.conf's [realms] or DNS SRV records; `relay egress` lists them)")]
    NoKdc {
        /// The realm.
        realm: String,
    },
    /// The KDC reported that the clocks differ too much.
    #[error("the KDC reports clock skew: this host's clock differs from the KDC's by more than it allows (5 minutes by default); synchronise the clock (NTP)")]
    ClockSkew,
    /// Anything else, in MIT Kerberos's words.
    #[error("Kerberos failed: {0}")]
    Other(String),
}

impl KerberosError {
    /// Whether the KDC refused the account's key: not tried again until the keytab changes.
    pub fn locks_out(&self) -> bool {
        matches!(self, KerberosError::KeyRefused { .. })
    }
}

/// What this process knows of its keytab.
struct State {
    /// The keytab in use and its fingerprint (with the principal asked for).
    current: Option<[u8; 32]>,
    /// Bumped when the keytab changes: names a fresh in-memory ticket cache.
    generation: u64,
    /// Fingerprints of keytabs whose key the KDC refused, with the principal refused.
    refused: Vec<([u8; 32], String)>,
}

/// One handshake at a time: MIT Kerberos is told the keytab and the ticket cache through its
/// environment variables, which change only here and only under this lock.
static STATE: Mutex<State> = Mutex::new(State {
    current: None,
    generation: 0,
    refused: Vec::new(),
});

/// Forgets every keytab the KDC refused (an operator's `relay proxy-retry`); returns how many.
pub fn forget_refused() -> usize {
    let mut state = STATE.lock().unwrap_or_else(|p| p.into_inner());
    std::mem::take(&mut state.refused).len()
}

/// The first Negotiate token for the proxy on `proxy_host`: Kerberos inside SPNEGO, without
/// delegation. Blocking (it may ask the KDC for tickets): run it off the async threads.
///
/// With a keytab, the tickets live in a ticket cache in this process's memory alone (no file
/// and no keyring), fetched from the keytab and fetched again before they expire; a keytab
/// that changed is read at the next handshake, with a fresh cache.
pub fn initial_token(login: &KerberosLogin, proxy_host: &str) -> Result<Token, KerberosError> {
    let spn = login.spn(proxy_host);
    let mut state = STATE.lock().unwrap_or_else(|p| p.into_inner());
    let keytab = login.keytab();
    let used = use_keytab(&mut state, login, keytab.as_deref())?;
    if let (Some(used), Some(path)) = (&used, &keytab) {
        if let Some((_, principal)) = state.refused.iter().find(|(p, _)| *p == used.fingerprint) {
            return Err(KerberosError::Held {
                principal: principal.clone(),
                keytab: path.display().to_string(),
            });
        }
    }
    let from_keytab = used.as_ref().and_then(|u| u.principal.clone());
    let result = token(login, keytab.as_deref(), from_keytab, &spn);
    if let (Err(KerberosError::KeyRefused { principal }), Some(used)) = (&result, &used) {
        state.refused.push((used.fingerprint, principal.clone()));
    }
    result
}

/// The keytab in use: its fingerprint (with the principal asked for) and the principal used
/// from it.
struct Keytab {
    fingerprint: [u8; 32],
    principal: Option<String>,
}

/// Points MIT Kerberos at `keytab` (read now), with a fresh in-memory ticket cache whenever it
/// or the principal asked for changed. Without a keytab, MIT Kerberos uses the credential cache
/// of the environment.
fn use_keytab(
    state: &mut State,
    login: &KerberosLogin,
    keytab: Option<&Path>,
) -> Result<Option<Keytab>, KerberosError> {
    let Some(path) = keytab else {
        return Ok(None);
    };
    let bytes = std::fs::read(path).map_err(|e| KerberosError::Keytab {
        path: path.display().to_string(),
        detail: e.to_string(),
    })?;
    let principal = login.principal.clone().or_else(|| first_principal(&bytes));
    let mut seed = bytes;
    seed.extend_from_slice(login.principal.as_deref().unwrap_or("").as_bytes());
    let fingerprint = crate::crypto::sha256(&seed);
    if state.current != Some(fingerprint) {
        state.generation += 1;
        state.current = Some(fingerprint);
        // Only MIT Kerberos reads these, and only under the lock the caller holds.
        std::env::set_var("KRB5_CLIENT_KTNAME", path);
        std::env::set_var("KRB5CCNAME", format!("MEMORY:relay-proxy-{}", state.generation));
    }
    Ok(Some(Keytab { fingerprint, principal }))
}

/// The principal of a keytab's first entry (`name/instance@REALM`), as MIT Kerberos chooses
/// it when none is asked for: the file format of keytabs, version 0x0502 (what MIT Kerberos,
/// `ktpass` and `ktutil` write; the older 0x0501 counts components differently and is not
/// read here).
fn first_principal(bytes: &[u8]) -> Option<String> {
    let mut at = 2;
    if bytes.get(..2)? != [5, 2] {
        return None;
    }
    let i32_at = |at: usize| Some(i32::from_be_bytes(bytes.get(at..at + 4)?.try_into().ok()?));
    let u16_at = |at: usize| Some(u16::from_be_bytes(bytes.get(at..at + 2)?.try_into().ok()?) as usize);
    loop {
        let size = i32_at(at)?;
        at += 4;
        if size < 0 {
            // A hole left by a removed entry.
            at += size.unsigned_abs() as usize;
            continue;
        }
        let entry = bytes.get(at..at + size as usize)?;
        let mut p = 0;
        let count = u16::from_be_bytes(entry.get(..2)?.try_into().ok()?) as usize;
        p += 2;
        let text = |p: &mut usize| -> Option<String> {
            let len = u16_at(at + *p)?;
            let s = String::from_utf8(entry.get(*p + 2..*p + 2 + len)?.to_vec()).ok()?;
            *p += 2 + len;
            Some(s)
        };
        let realm = text(&mut p)?;
        let parts = (0..count).map(|_| text(&mut p)).collect::<Option<Vec<_>>>()?;
        return Some(format!("{}@{realm}", parts.join("/")));
    }
}

fn token(
    login: &KerberosLogin,
    keytab: Option<&Path>,
    from_keytab: Option<String>,
    spn: &str,
) -> Result<Token, KerberosError> {
    let known = login.principal.clone().or(from_keytab);
    let fail = |e: libgssapi::error::Error, client: Option<&str>| {
        explain(&e.to_string(), keytab, known.as_deref().or(client), spn)
    };
    let wanted = match &login.principal {
        Some(p) => Some(Name::new(p.as_bytes(), Some(GSS_NT_KRB5_PRINCIPAL)).map_err(|e| fail(e, None))?),
        None => None,
    };
    let mechs = OidSet::singleton(GSS_MECH_KRB5).map_err(|e| fail(e, None))?;
    let cred = Cred::acquire(wanted.as_ref(), None, CredUsage::Initiate, Some(&mechs)).map_err(|e| fail(e, None))?;
    // Asking the name resolves the credential: the KDC is asked for a ticket here when the
    // cache holds none, so its refusal is explained here.
    let client = match &known {
        Some(name) => name.clone(),
        None => cred.name().map_err(|e| fail(e, None))?.to_string(),
    };
    let target = Name::new(spn.as_bytes(), Some(GSS_NT_KRB5_PRINCIPAL)).map_err(|e| fail(e, None))?;
    // No delegation flag: the proxy never gets a ticket it could act on as the agent.
    let mut ctx = ClientCtx::new(Some(cred), target, CtxFlags::empty(), Some(GSS_MECH_SPNEGO));
    let token = ctx.step(None, None).map_err(|e| fail(e, Some(&client)))?;
    let token = token.map(|t| t.to_vec()).unwrap_or_default();
    if token.is_empty() {
        return Err(KerberosError::Other("GSSAPI made no token".into()));
    }
    Ok(Token {
        token,
        client,
        spn: spn.to_owned(),
    })
}

/// The realm of a principal (`user@REALM`), if it names one.
fn realm_of(principal: &str) -> Option<&str> {
    principal
        .rsplit_once('@')
        .map(|(_, realm)| realm)
        .filter(|r| !r.is_empty())
}

/// Turns MIT Kerberos's message into what the operator can act on. The messages come from
/// MIT's error tables, whose wording has been stable for decades.
fn explain(text: &str, keytab: Option<&Path>, client: Option<&str>, spn: &str) -> KerberosError {
    let keytab_name = || {
        keytab
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "(no keytab)".into())
    };
    let client_name = || client.unwrap_or("the keytab's principal").to_owned();
    if text.contains("Can't find client principal") {
        return KerberosError::NoKeyFor {
            keytab: keytab_name(),
            principal: client_name(),
        };
    }
    if text.contains("No Kerberos credentials available") || text.contains("No key table entry found") {
        let where_ = match keytab {
            Some(p) => format!("the keytab {} holds no keys", p.display()),
            None => "no keytab is configured and the credential cache (KRB5CCNAME) holds no ticket".into(),
        };
        return KerberosError::NoKeys { where_ };
    }
    if text.contains("Key table entry not found") {
        return KerberosError::NoKeyFor {
            keytab: keytab_name(),
            principal: client_name(),
        };
    }
    if text.contains("Server") && text.contains("not found in Kerberos database") {
        return KerberosError::ServerUnknown { spn: spn.to_owned() };
    }
    if text.contains("Client") && text.contains("not found in Kerberos database") {
        return KerberosError::ClientUnknown {
            principal: client_name(),
        };
    }
    if text.contains("Cannot contact any KDC") || text.contains("Cannot find KDC") {
        let realm = text
            .split('\'')
            .nth(1)
            .map(str::to_owned)
            .or_else(|| client.and_then(realm_of).map(str::to_owned))
            .unwrap_or_else(|| "?".into());
        return KerberosError::NoKdc { realm };
    }
    if text.contains("Clock skew too great") {
        return KerberosError::ClockSkew;
    }
    if text.contains("Preauthentication failed")
        || text.contains("Decrypt integrity check failed")
        || text.contains("Password incorrect")
        || text.contains("Key version number for principal in key table is incorrect")
    {
        return KerberosError::KeyRefused {
            principal: client_name(),
        };
    }
    KerberosError::Other(text.to_owned())
}

/// Where the realm's KDCs come from, for `relay egress`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Realm {
    /// The realm.
    pub name: String,
    /// The client principal.
    pub principal: String,
    /// `host:port` of each KDC that krb5.conf names; empty when DNS names them.
    pub kdcs: Vec<String>,
    /// Where the list comes from, in words.
    pub source: String,
}

/// The agent's realm (from its principal: configured, or the keytab's first entry) and where
/// its KDCs come from: the `kdc` lines of krb5.conf's `[realms]` section, or DNS SRV records
/// when krb5.conf names none (and does not turn DNS off). Reads the keytab, asks no KDC.
pub fn realm(login: &KerberosLogin) -> Result<Realm, KerberosError> {
    let mut state = STATE.lock().unwrap_or_else(|p| p.into_inner());
    let keytab = login.keytab();
    let used = use_keytab(&mut state, login, keytab.as_deref())?;
    let principal = match used.and_then(|u| u.principal) {
        Some(principal) => principal,
        None => {
            // A credential cache: its principal.
            let fail = |e: libgssapi::error::Error| explain(&e.to_string(), keytab.as_deref(), None, "");
            let mechs = OidSet::singleton(GSS_MECH_KRB5).map_err(fail)?;
            let cred = Cred::acquire(None, None, CredUsage::Initiate, Some(&mechs)).map_err(fail)?;
            cred.name().map_err(fail)?.to_string()
        }
    };
    drop(state);
    let files = config_files();
    let name = match realm_of(&principal) {
        Some(r) => r.to_owned(),
        None => default_realm(&files).unwrap_or_default(),
    };
    let kdcs = realm_kdcs(&files, &name);
    let shown = files
        .iter()
        .map(|f| f.0.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let source = if !kdcs.is_empty() {
        format!("krb5.conf ({shown}), [realms] {name} kdc")
    } else if dns_lookup_kdc(&files) {
        format!("DNS SRV records _kerberos._udp.{name} and _kerberos._tcp.{name} (krb5.conf names no KDC for it), looked up at each ticket request")
    } else {
        format!("none: krb5.conf ({shown}) names no KDC for {name} and turns DNS lookup off (dns_lookup_kdc = false)")
    };
    Ok(Realm {
        name,
        principal,
        kdcs,
        source,
    })
}

/// MIT's configuration files as it reads them: `KRB5_CONFIG` (colon-separated), else
/// `/etc/krb5.conf`; each with its text, where it can be read.
fn config_files() -> Vec<(PathBuf, String)> {
    let list = std::env::var("KRB5_CONFIG").unwrap_or_else(|_| "/etc/krb5.conf".into());
    list.split(':')
        .filter(|p| !p.is_empty())
        .filter_map(|p| Some((PathBuf::from(p), std::fs::read_to_string(p).ok()?)))
        .collect()
}

/// The relations of a profile file as (section, realm block or "", key, value), in order.
/// The profile syntax: `[section]`, `key = value`, `NAME = {` … `}` blocks, `#`/`;` comments.
fn relations(text: &str) -> Vec<(String, String, String, String)> {
    let mut out = Vec::new();
    let (mut section, mut block) = (String::new(), Vec::<String>::new());
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim().to_owned();
            block.clear();
            continue;
        }
        if line.starts_with('}') {
            block.pop();
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let (key, value) = (key.trim().to_owned(), value.trim().to_owned());
        if value == "{" {
            block.push(key);
            continue;
        }
        let outer = block.first().cloned().unwrap_or_default();
        out.push((section.clone(), outer, key, value));
    }
    out
}

/// `libdefaults.default_realm`, from the first file that sets it.
fn default_realm(files: &[(PathBuf, String)]) -> Option<String> {
    files.iter().find_map(|(_, text)| {
        relations(text)
            .into_iter()
            .find(|(s, b, k, _)| s == "libdefaults" && b.is_empty() && k == "default_realm")
            .map(|(_, _, _, v)| v)
    })
}

/// The `kdc` relations of `[realms] realm`, as `host:port` (port 88 when not given).
fn realm_kdcs(files: &[(PathBuf, String)], realm: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (_, text) in files {
        for (s, b, k, v) in relations(text) {
            if s == "realms" && b == realm && k == "kdc" {
                let has_port = v.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok());
                let kdc = if has_port { v } else { format!("{v}:88") };
                if !out.contains(&kdc) {
                    out.push(kdc);
                }
            }
        }
    }
    out
}

/// `libdefaults.dns_lookup_kdc` (true unless a file turns it off).
fn dns_lookup_kdc(files: &[(PathBuf, String)]) -> bool {
    let set = files.iter().find_map(|(_, text)| {
        relations(text)
            .into_iter()
            .find(|(s, b, k, _)| s == "libdefaults" && b.is_empty() && k == "dns_lookup_kdc")
            .map(|(_, _, _, v)| v)
    });
    !matches!(
        set.as_deref().map(str::to_ascii_lowercase).as_deref(),
        Some("false" | "no" | "0" | "off")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONF: &str = "[libdefaults]\n  default_realm = CORP.EXAMPLE\n  dns_lookup_kdc = false\n\
        # a comment\n[realms]\n  CORP.EXAMPLE = {\n    kdc = dc1.corp.example\n    kdc = dc2.corp.example:750\n\
        \x20   admin_server = dc1.corp.example\n  }\n  OTHER.EXAMPLE = {\n    kdc = other:88\n  }\n\
        [domain_realm]\n  .corp.example = CORP.EXAMPLE\n";

    #[test]
    fn krb5_conf_names_the_realm_and_its_kdcs() {
        let files = vec![(PathBuf::from("/etc/krb5.conf"), CONF.to_owned())];
        assert_eq!(default_realm(&files).as_deref(), Some("CORP.EXAMPLE"));
        assert_eq!(
            realm_kdcs(&files, "CORP.EXAMPLE"),
            ["dc1.corp.example:88", "dc2.corp.example:750"]
        );
        assert_eq!(realm_kdcs(&files, "OTHER.EXAMPLE"), ["other:88"]);
        assert!(realm_kdcs(&files, "NONE.EXAMPLE").is_empty());
        assert!(!dns_lookup_kdc(&files));
        let dns = vec![(PathBuf::from("x"), "[libdefaults]\n default_realm = A\n".to_owned())];
        assert!(dns_lookup_kdc(&dns));
    }

    #[test]
    fn mit_messages_become_what_to_do() {
        let keytab = Path::new("/etc/relay/agent.keytab");
        let spn = "HTTP/proxy";
        let e = explain(
            "Unspecified GSS failure. (Server HTTP/proxy@CORP not found in Kerberos database)",
            Some(keytab),
            Some("svc@CORP"),
            spn,
        );
        assert!(
            e.to_string().contains("the proxy's principal HTTP/proxy") && e.to_string().contains("agent.proxy_spn")
        );
        let e = explain("(Cannot contact any KDC for realm 'CORP')", Some(keytab), None, spn);
        assert_eq!(e, KerberosError::NoKdc { realm: "CORP".into() });
        let e = explain("(Clock skew too great)", Some(keytab), None, spn);
        assert_eq!(e, KerberosError::ClockSkew);
        let e = explain(
            "(Can't find client principal svc@CORP in cache collection)",
            Some(keytab),
            Some("svc@CORP"),
            spn,
        );
        assert!(e.to_string().contains("holds no key for svc@CORP"), "{e}");
        let e = explain("(Preauthentication failed)", Some(keytab), Some("svc@CORP"), spn);
        assert!(e.locks_out());
        let e = explain("(Decrypt integrity check failed)", Some(keytab), Some("svc@CORP"), spn);
        assert!(e.locks_out());
        let e = explain(
            "(Client 'svc@CORP' not found in Kerberos database)",
            Some(keytab),
            Some("svc@CORP"),
            spn,
        );
        assert!(matches!(e, KerberosError::ClientUnknown { .. }));
        assert!(!e.locks_out());
    }

    #[test]
    fn a_keytab_names_its_first_principal() {
        let text = |s: &str| {
            let mut v = (s.len() as u16).to_be_bytes().to_vec();
            v.extend_from_slice(s.as_bytes());
            v
        };
        let entry = |parts: &[&str]| {
            let mut e = (parts.len() as u16).to_be_bytes().to_vec();
            e.extend(text("CORP.EXAMPLE"));
            for part in parts {
                e.extend(text(part));
            }
            e.extend_from_slice(&1u32.to_be_bytes()); // name type
            e.extend_from_slice(&0u32.to_be_bytes()); // timestamp
            e.push(3); // key version
            e.extend_from_slice(&18u16.to_be_bytes());
            e.extend(text("0123456789abcdef0123456789abcdef"));
            e
        };
        let mut keytab = vec![5, 2];
        // A hole, then two entries: the first one counts.
        keytab.extend_from_slice(&(-4i32).to_be_bytes());
        keytab.extend_from_slice(&[0; 4]);
        for parts in [&["svc-relay"][..], &["HTTP", "proxy.corp.example"][..]] {
            let e = entry(parts);
            keytab.extend_from_slice(&(e.len() as i32).to_be_bytes());
            keytab.extend(e);
        }
        assert_eq!(first_principal(&keytab).as_deref(), Some("svc-relay@CORP.EXAMPLE"));
        assert_eq!(first_principal(&keytab[..20]), None);
        assert_eq!(first_principal(b"not a keytab"), None);
        assert_eq!(first_principal(&[5, 2]), None);
    }

    #[test]
    fn the_proxy_principal_is_the_host_as_configured_unless_set() {
        let login = KerberosLogin::default();
        assert_eq!(login.spn("proxy.corp.example"), "HTTP/proxy.corp.example");
        let login = KerberosLogin {
            spn: Some("HTTP/squid01.corp.example@CORP.EXAMPLE".into()),
            ..KerberosLogin::default()
        };
        assert_eq!(login.spn("proxy"), "HTTP/squid01.corp.example@CORP.EXAMPLE");
    }
}
