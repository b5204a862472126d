//! The NTLM handshake (NTLMv2 only), client side, through the `sspi` crate; the only module
//! that touches it.

use sspi::{
    AuthIdentity, BufferType, ClientRequestFlags, CredentialUse, DataRepresentation, Ntlm, SecurityBuffer,
    SecurityStatus, Sspi, SspiImpl, Username,
};

/// A Windows account for NTLM: `DOMAIN\user` (or `user@domain`) and its password. The
/// password is never printed: `Debug` shows the account alone.
#[derive(Clone, PartialEq, Eq)]
pub struct NtlmAccount {
    /// The user name as given, `DOMAIN\user` or `user@domain` or a bare user.
    pub user: String,
    password: String,
}

impl std::fmt::Debug for NtlmAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NtlmAccount")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl NtlmAccount {
    /// An account from a user name and its password.
    pub fn new(user: &str, password: &str) -> NtlmAccount {
        NtlmAccount {
            user: user.to_owned(),
            password: password.to_owned(),
        }
    }

    /// The account as Basic credentials (`base64(user:password)`), for a proxy pinned to
    /// Basic.
    pub fn basic_token(&self) -> String {
        data_encoding::BASE64.encode(format!("{}:{}", self.user, self.password).as_bytes())
    }

    /// A fingerprint of the account and password together (SHA-256, never the password
    /// itself), to tell whether a credential a proxy refused has changed since.
    pub fn fingerprint(&self) -> [u8; 32] {
        crate::crypto::sha256(format!("{}\n{}", self.user, self.password).as_bytes())
    }
}

/// Why an NTLM message could not be made.
#[derive(Debug, thiserror::Error)]
pub enum NtlmError {
    /// The user name is not `DOMAIN\user`, `user@domain` or a bare name.
    #[error("the proxy user {0:?} is not DOMAIN\\user, user@domain or a user name")]
    BadUser(String),
    /// The proxy's challenge could not be read, or the handshake failed in the library.
    #[error("the NTLM handshake failed: {0}")]
    Handshake(String),
}

/// One NTLM handshake, client side: [`NtlmHandshake::start`] gives the NEGOTIATE message,
/// [`NtlmHandshake::answer`] turns the proxy's CHALLENGE into the AUTHENTICATE message.
pub struct NtlmHandshake {
    ntlm: Ntlm,
    credentials: Option<sspi::AuthIdentityBuffers>,
    target: String,
}

impl NtlmHandshake {
    /// Starts a handshake for `account` with the proxy `target` (its host name); returns the
    /// NEGOTIATE message to send.
    pub fn start(account: &NtlmAccount, target: &str) -> Result<(NtlmHandshake, Vec<u8>), NtlmError> {
        let username = Username::parse(&account.user).map_err(|_| NtlmError::BadUser(account.user.clone()))?;
        let identity = AuthIdentity {
            username,
            password: account.password.clone().into(),
        };
        let mut ntlm = Ntlm::new();
        let acquired = ntlm
            .acquire_credentials_handle()
            .with_credential_use(CredentialUse::Outbound)
            .with_auth_data(&identity)
            .execute(&mut ntlm)
            .map_err(|e| NtlmError::Handshake(e.to_string()))?;
        let mut handshake = NtlmHandshake {
            ntlm,
            credentials: acquired.credentials_handle,
            target: target.to_owned(),
        };
        let negotiate = handshake.step(None)?;
        Ok((handshake, negotiate))
    }

    /// The AUTHENTICATE message answering the proxy's CHALLENGE message.
    pub fn answer(mut self, challenge: &[u8]) -> Result<Vec<u8>, NtlmError> {
        self.step(Some(challenge))
    }

    fn step(&mut self, input: Option<&[u8]>) -> Result<Vec<u8>, NtlmError> {
        let mut output = vec![SecurityBuffer::new(Vec::new(), BufferType::Token)];
        let mut input = input.map(|i| vec![SecurityBuffer::new(i.to_vec(), BufferType::Token)]);
        let target = self.target.clone();
        let mut builder = self
            .ntlm
            .initialize_security_context()
            .with_credentials_handle(&mut self.credentials)
            .with_context_requirements(ClientRequestFlags::ALLOCATE_MEMORY)
            .with_target_data_representation(DataRepresentation::Native)
            .with_target_name(&target)
            .with_output(&mut output);
        if let Some(input) = input.as_mut() {
            builder = builder.with_input(input);
        }
        let result = self
            .ntlm
            .initialize_security_context_impl(&mut builder)
            .and_then(|mut g| g.resolve_to_result())
            .map_err(|e| NtlmError::Handshake(e.to_string()))?;
        if [SecurityStatus::CompleteAndContinue, SecurityStatus::CompleteNeeded].contains(&result.status) {
            self.ntlm
                .complete_auth_token(&mut output)
                .map_err(|e| NtlmError::Handshake(e.to_string()))?;
        }
        Ok(std::mem::take(&mut output[0].buffer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CHALLENGE message as a Windows proxy sends one: server challenge, flags for NTLMv2
    /// with extended session security, and target information with a timestamp.
    fn challenge() -> Vec<u8> {
        let utf16 = |s: &str| s.encode_utf16().flat_map(u16::to_le_bytes).collect::<Vec<u8>>();
        let pair = |kind: u16, value: &[u8]| {
            let mut v = kind.to_le_bytes().to_vec();
            v.extend_from_slice(&(value.len() as u16).to_le_bytes());
            v.extend_from_slice(value);
            v
        };
        let target = utf16("CORP");
        let mut info = pair(2, &target);
        info.extend(pair(1, &utf16("PROXY")));
        info.extend(pair(7, &133_000_000_000_000_000u64.to_le_bytes()));
        info.extend(pair(0, &[]));
        let flags: u32 =
            0x1 | 0x4 | 0x200 | 0x8000 | 0x10000 | 0x80000 | 0x800000 | 0x2000000 | 0x20000000 | 0x80000000;
        let mut m = b"NTLMSSP\0".to_vec();
        m.extend_from_slice(&2u32.to_le_bytes());
        let buffer = |m: &mut Vec<u8>, len: usize, offset: usize| {
            m.extend_from_slice(&(len as u16).to_le_bytes());
            m.extend_from_slice(&(len as u16).to_le_bytes());
            m.extend_from_slice(&(offset as u32).to_le_bytes());
        };
        buffer(&mut m, target.len(), 56);
        m.extend_from_slice(&flags.to_le_bytes());
        m.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        m.extend_from_slice(&[0; 8]);
        buffer(&mut m, info.len(), 56 + target.len());
        m.extend_from_slice(&[10, 0, 0x7c, 0x4f, 0, 0, 0, 15]);
        m.extend_from_slice(&target);
        m.extend_from_slice(&info);
        m
    }

    #[test]
    fn a_handshake_makes_ntlm_messages_and_its_answer_is_ntlmv2() {
        let account = NtlmAccount::new("CORP\\ops", "secret");
        assert!(!format!("{account:?}").contains("secret"));
        let (handshake, negotiate) = NtlmHandshake::start(&account, "proxy.corp.test").unwrap();
        assert_eq!(&negotiate[..8], b"NTLMSSP\0");
        assert_eq!(negotiate[8], 1, "a NEGOTIATE message");
        let authenticate = handshake.answer(&challenge()).unwrap();
        assert_eq!(authenticate[8], 3, "an AUTHENTICATE message");
        // The NT answer is longer than NTLMv1's 24 bytes: NTLMv2.
        let nt_len = u16::from_le_bytes([authenticate[20], authenticate[21]]);
        assert!(nt_len > 24, "NTLMv2 answer, {nt_len} bytes");
    }
}
