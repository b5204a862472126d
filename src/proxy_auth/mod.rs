//! Proxy authentication beyond Basic, client side: NTLM ([`ntlm`], through `sspi`) and Kerberos
//! for Negotiate ([`kerberos`], through MIT Kerberos's GSSAPI). Each library stays behind its
//! module; the proxy code in `http` drives the handshakes.

pub mod kerberos;
pub mod ntlm;

pub use ntlm::{NtlmAccount, NtlmError, NtlmHandshake};
