//! A minimal, pure DER reader for X.509 certificates: just enough to find the
//! SubjectPublicKeyInfo (for the SPKI pin) and to show subject and issuer to an operator.

use crate::crypto::{hex, sha256};

/// Text in front of the hex of a pin, naming the hash so other hashes can be added later.
pub const PIN_PREFIX: &str = "sha256/";

const TAG_INTEGER: u8 = 0x02;
const TAG_BIT_STRING: u8 = 0x03;
const TAG_OID: u8 = 0x06;
const TAG_UTF8_STRING: u8 = 0x0c;
const TAG_PRINTABLE_STRING: u8 = 0x13;
const TAG_T61_STRING: u8 = 0x14;
const TAG_IA5_STRING: u8 = 0x16;
const TAG_BMP_STRING: u8 = 0x1e;
const TAG_SEQUENCE: u8 = 0x30;
const TAG_SET: u8 = 0x31;
const TAG_VERSION: u8 = 0xa0;

/// Longer length fields would describe more than 4 GiB: never a certificate.
const MAX_LENGTH_BYTES: usize = 4;

/// Why a certificate could not be read. Each message says which part of the certificate failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum X509Error {
    /// No bytes at all.
    #[error("the certificate is empty")]
    Empty,

    /// PEM text was given where DER bytes are needed.
    #[error("the certificate is PEM text (-----BEGIN ...); relay needs the DER bytes it contains")]
    Pem,

    /// A field is missing or its length runs past the end of the data.
    #[error("the certificate is truncated or damaged: {0} is missing or runs past the end")]
    Truncated(&'static str),

    /// BER's indefinite length form, which DER forbids.
    #[error("the certificate is not DER: {0} uses an indefinite length")]
    IndefiniteLength(&'static str),

    /// A length field of more than 4 bytes.
    #[error("the certificate is damaged: the length of {0} takes more than 4 bytes")]
    LengthTooLong(&'static str),

    /// A field of the wrong type where the certificate structure needs another.
    #[error("this is not an X.509 certificate: expected {expected}, found DER tag 0x{found:02x}")]
    UnexpectedTag {
        /// The field that was expected.
        expected: &'static str,
        /// The tag byte found instead.
        found: u8,
    },

    /// Any other structural fault.
    #[error("this is not a well-formed X.509 certificate: {0}")]
    Malformed(&'static str),
}

/// What relay needs to know about a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The complete DER encoding (tag, length and content) of subjectPublicKeyInfo.
    pub spki_der: Vec<u8>,
    /// Subject name for humans, e.g. `CN=relay-node, O=Example`, in certificate order.
    pub subject: String,
    /// Issuer name, rendered like `subject`.
    pub issuer: String,
}

/// Reads the parts of a DER certificate that relay uses. Signatures are not checked: that is the
/// TLS library's job, and the pin is compared separately.
pub fn parse_certificate(der: &[u8]) -> Result<CertInfo, X509Error> {
    if der.is_empty() {
        return Err(X509Error::Empty);
    }
    if der.trim_ascii_start().starts_with(b"-----BEGIN") {
        return Err(X509Error::Pem);
    }
    let (cert, rest) = read_expected(der, TAG_SEQUENCE, "the Certificate sequence")?;
    if !rest.is_empty() {
        return Err(X509Error::Malformed("there are bytes after the certificate"));
    }
    let (tbs, after_tbs) = read_expected(cert.value, TAG_SEQUENCE, "tbsCertificate")?;
    let (_, after_algorithm) = read_expected(after_tbs, TAG_SEQUENCE, "signatureAlgorithm")?;
    let (_, after_signature) = read_expected(after_algorithm, TAG_BIT_STRING, "signatureValue")?;
    if !after_signature.is_empty() {
        return Err(X509Error::Malformed("there are fields after the signature"));
    }

    let mut fields = tbs.value;
    if fields.first() == Some(&TAG_VERSION) {
        fields = read_tlv(fields, "version")?.1;
    }
    let (_, fields) = read_expected(fields, TAG_INTEGER, "serialNumber")?;
    let (_, fields) = read_expected(fields, TAG_SEQUENCE, "signature algorithm")?;
    let (issuer, fields) = read_expected(fields, TAG_SEQUENCE, "issuer")?;
    let (_, fields) = read_expected(fields, TAG_SEQUENCE, "validity")?;
    let (subject, fields) = read_expected(fields, TAG_SEQUENCE, "subject")?;
    let (spki, _extensions) = read_expected(fields, TAG_SEQUENCE, "subjectPublicKeyInfo")?;

    // The pin is only meaningful over a real SubjectPublicKeyInfo, so check its shape too.
    let (_, key) = read_expected(spki.value, TAG_SEQUENCE, "the public key algorithm")?;
    let (_, after_key) = read_expected(key, TAG_BIT_STRING, "subjectPublicKey")?;
    if !after_key.is_empty() {
        return Err(X509Error::Malformed("subjectPublicKeyInfo has fields after the key"));
    }

    Ok(CertInfo {
        spki_der: spki.full.to_vec(),
        subject: render_name(subject.value, "subject")?,
        issuer: render_name(issuer.value, "issuer")?,
    })
}

/// SHA-256 of the DER SubjectPublicKeyInfo (the "SPKI pin").
pub fn spki_sha256(der: &[u8]) -> Result<[u8; 32], X509Error> {
    parse_certificate(der).map(|info| sha256(&info.spki_der))
}

/// Pin as text for humans: "sha256/" + lowercase hex.
pub fn format_pin(pin: &[u8; 32]) -> String {
    format!("{PIN_PREFIX}{}", hex(pin))
}

/// One DER element.
struct Tlv<'a> {
    /// First identifier byte; enough to tell apart every type this reader looks for.
    tag: u8,
    value: &'a [u8],
    /// Identifier, length and value together.
    full: &'a [u8],
}

/// Splits the first element off `input`. `what` names it in errors.
fn read_tlv<'a>(input: &'a [u8], what: &'static str) -> Result<(Tlv<'a>, &'a [u8]), X509Error> {
    let (&tag, mut rest) = input.split_first().ok_or(X509Error::Truncated(what))?;
    if tag & 0x1f == 0x1f {
        // High tag numbers continue in following bytes; none is expected in a certificate's
        // walked fields, but attribute values may use them and are then shown as hex.
        let extra = rest.iter().take_while(|&&b| b & 0x80 != 0).count() + 1;
        if extra > MAX_LENGTH_BYTES {
            return Err(X509Error::Malformed("a tag number is too long"));
        }
        rest = rest.get(extra..).ok_or(X509Error::Truncated(what))?;
    }
    let (&first, mut rest) = rest.split_first().ok_or(X509Error::Truncated(what))?;
    let length = match first {
        0x00..=0x7f => usize::from(first),
        0x80 => return Err(X509Error::IndefiniteLength(what)),
        _ => {
            let count = usize::from(first & 0x7f);
            if count > MAX_LENGTH_BYTES {
                return Err(X509Error::LengthTooLong(what));
            }
            let bytes = rest.get(..count).ok_or(X509Error::Truncated(what))?;
            rest = &rest[count..];
            let length = bytes.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
            usize::try_from(length).map_err(|_| X509Error::Truncated(what))?
        }
    };
    let value = rest.get(..length).ok_or(X509Error::Truncated(what))?;
    let header_len = input.len() - rest.len();
    let full = &input[..header_len + length];
    Ok((Tlv { tag, value, full }, &rest[length..]))
}

/// Like [`read_tlv`], insisting on `tag`.
fn read_expected<'a>(input: &'a [u8], tag: u8, what: &'static str) -> Result<(Tlv<'a>, &'a [u8]), X509Error> {
    let (tlv, rest) = read_tlv(input, what)?;
    if tlv.tag != tag {
        return Err(X509Error::UnexpectedTag {
            expected: what,
            found: tlv.tag,
        });
    }
    Ok((tlv, rest))
}

/// Renders a Name's RDNs as `CN=foo, O=bar`; attributes of a multi-valued RDN are joined by '+'.
fn render_name(mut rdns: &[u8], what: &'static str) -> Result<String, X509Error> {
    let mut parts = Vec::new();
    while !rdns.is_empty() {
        let (set, rest) = read_expected(rdns, TAG_SET, what)?;
        rdns = rest;
        let mut attributes = Vec::new();
        let mut members = set.value;
        while !members.is_empty() {
            let (attribute, rest) = read_expected(members, TAG_SEQUENCE, what)?;
            members = rest;
            let (oid, rest) = read_expected(attribute.value, TAG_OID, what)?;
            let (value, rest) = read_tlv(rest, what)?;
            if !rest.is_empty() {
                return Err(X509Error::Malformed("a name attribute has extra fields"));
            }
            attributes.push(format!("{}={}", attribute_name(oid.value)?, render_value(&value)));
        }
        if !attributes.is_empty() {
            parts.push(attributes.join("+"));
        }
    }
    Ok(parts.join(", "))
}

fn attribute_name(oid: &[u8]) -> Result<String, X509Error> {
    // 2.5.4.x encodes as 0x55 0x04 x.
    let short = match oid {
        [0x55, 0x04, 0x03] => "CN",
        [0x55, 0x04, 0x06] => "C",
        [0x55, 0x04, 0x07] => "L",
        [0x55, 0x04, 0x08] => "ST",
        [0x55, 0x04, 0x0a] => "O",
        [0x55, 0x04, 0x0b] => "OU",
        _ => return dotted_oid(oid),
    };
    Ok(short.to_string())
}

/// Dotted-decimal form of an OID's content bytes.
fn dotted_oid(oid: &[u8]) -> Result<String, X509Error> {
    let bad = X509Error::Malformed("a name attribute type is not a valid object identifier");
    if oid.is_empty() || oid.last().is_some_and(|b| b & 0x80 != 0) {
        return Err(bad);
    }
    let mut arcs = Vec::new();
    let mut arc: u64 = 0;
    for &byte in oid {
        if arc > u64::MAX >> 7 {
            return Err(bad);
        }
        arc = (arc << 7) | u64::from(byte & 0x7f);
        if byte & 0x80 == 0 {
            arcs.push(arc);
            arc = 0;
        }
    }
    // The first encoded number packs the first two arcs as 40 * first + second.
    let (first, second) = match arcs.first() {
        Some(&v) if v < 40 => (0, v),
        Some(&v) if v < 80 => (1, v - 40),
        Some(&v) => (2, v - 80),
        None => return Err(bad),
    };
    let mut text = format!("{first}.{second}");
    for arc in arcs.iter().skip(1) {
        text.push('.');
        text.push_str(&arc.to_string());
    }
    Ok(text)
}

/// An attribute value as text, or `#` + hex of its whole DER encoding when it is not one of the
/// string types understood here.
fn render_value(value: &Tlv<'_>) -> String {
    let text = match value.tag {
        TAG_UTF8_STRING => std::str::from_utf8(value.value).ok().map(str::to_owned),
        TAG_PRINTABLE_STRING | TAG_IA5_STRING => value
            .value
            .is_ascii()
            .then(|| value.value.iter().map(|&b| char::from(b)).collect()),
        // Real-world T61 strings are almost always latin-1 in practice.
        TAG_T61_STRING => Some(value.value.iter().map(|&b| char::from(b)).collect()),
        TAG_BMP_STRING if value.value.len() % 2 == 0 => char::decode_utf16(
            value
                .value
                .chunks_exact(2)
                .map(|pair| u16::from_be_bytes([pair[0], pair[1]])),
        )
        .collect::<Result<String, _>>()
        .ok(),
        _ => None,
    };
    match text {
        Some(text) => escape_value(&text),
        None => format!("#{}", hex(value.full)),
    }
}

/// Escapes what would let a value pass for more name components (`,` `+` ...) or act on a
/// terminal (control characters), in the style of RFC 4514.
fn escape_value(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for (index, c) in text.chars().enumerate() {
        match c {
            ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=' => {
                out.push('\\');
                out.push(c);
            }
            '#' if index == 0 => out.push_str("\\#"),
            c if c.is_control() => {
                let mut buf = [0u8; 4];
                for byte in c.encode_utf8(&mut buf).bytes() {
                    out.push('\\');
                    out.push_str(&hex(&[byte]));
                }
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rcgen::{
        BmpString, CertificateParams, DistinguishedName, DnType, DnValue, Ia5String, KeyPair, PrintableString,
        TeletexString, UniversalString,
    };

    fn simple_cert() -> rcgen::CertifiedKey {
        rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap()
    }

    /// A DER element with the shortest length form.
    fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let len = content.len();
        if len < 0x80 {
            out.push(len as u8);
        } else {
            let bytes = (len as u32).to_be_bytes();
            let skip = bytes.iter().take_while(|&&b| b == 0).count();
            out.push(0x80 | (4 - skip) as u8);
            out.extend_from_slice(&bytes[skip..]);
        }
        out.extend_from_slice(content);
        out
    }

    /// A DER element whose length is forced into `count` long-form bytes.
    fn tlv_long(tag: u8, content: &[u8], count: usize) -> Vec<u8> {
        let mut out = vec![tag, 0x80 | count as u8];
        let bytes = (content.len() as u64).to_be_bytes();
        out.extend_from_slice(&bytes[8 - count..]);
        out.extend_from_slice(content);
        out
    }

    fn attribute(oid: &[u8], value: Vec<u8>) -> Vec<u8> {
        tlv(TAG_SET, &tlv(TAG_SEQUENCE, &[tlv(TAG_OID, oid), value].concat()))
    }

    fn sample_spki() -> Vec<u8> {
        let algorithm = tlv(TAG_SEQUENCE, &tlv(TAG_OID, &[0x2b, 0x65, 0x70]));
        let key = tlv(TAG_BIT_STRING, &[[0u8].as_slice(), &[7u8; 32]].concat());
        tlv(TAG_SEQUENCE, &[algorithm, key].concat())
    }

    /// A structurally complete certificate built by hand (the signature is not a real one).
    fn hand_made(version: bool, issuer: &[u8], subject: &[u8], spki: &[u8]) -> Vec<u8> {
        let algorithm = tlv(TAG_SEQUENCE, &tlv(TAG_OID, &[0x2b, 0x65, 0x70]));
        let mut tbs = Vec::new();
        if version {
            tbs.extend(tlv(TAG_VERSION, &tlv(TAG_INTEGER, &[2])));
        }
        tbs.extend(tlv(TAG_INTEGER, &[1]));
        tbs.extend(&algorithm);
        tbs.extend(tlv(TAG_SEQUENCE, issuer));
        tbs.extend(tlv(TAG_SEQUENCE, &[]));
        tbs.extend(tlv(TAG_SEQUENCE, subject));
        tbs.extend(spki);
        let signature = tlv(TAG_BIT_STRING, &[0, 1, 2, 3]);
        tlv(TAG_SEQUENCE, &[tlv(TAG_SEQUENCE, &tbs), algorithm, signature].concat())
    }

    #[test]
    fn reads_an_rcgen_simple_certificate() {
        let certified = simple_cert();
        let info = parse_certificate(certified.cert.der()).unwrap();
        assert_eq!(info.spki_der, certified.key_pair.public_key_der());
        // rcgen's default distinguished name.
        assert_eq!(info.subject, "CN=rcgen self signed cert");
        assert_eq!(info.issuer, info.subject);
    }

    #[test]
    fn pins_match_the_public_key_for_each_key_type() {
        for algorithm in [
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
            &rcgen::PKCS_ED25519,
        ] {
            let key_pair = KeyPair::generate_for(algorithm).unwrap();
            let cert = CertificateParams::new(vec!["relay.example.com".into()])
                .unwrap()
                .self_signed(&key_pair)
                .unwrap();
            let pin = spki_sha256(cert.der()).unwrap();
            assert_eq!(pin, sha256(&key_pair.public_key_der()));
            let text = format_pin(&pin);
            assert!(text.starts_with("sha256/"));
            assert_eq!(text.len(), 7 + 64);
            assert_eq!(text, format!("sha256/{}", hex(&pin)));
        }
    }

    #[test]
    fn reads_a_common_name_set_on_rcgen_defaults() {
        let key_pair = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".into()]).unwrap();
        // rcgen's defaults already hold a CN; pushing another replaces it.
        params.distinguished_name.push(DnType::CommonName, "relay-node");
        let cert = params.self_signed(&key_pair).unwrap();
        let info = parse_certificate(cert.der()).unwrap();
        assert_eq!(info.subject, "CN=relay-node");
        assert_eq!(info.issuer, "CN=relay-node");
        assert_eq!(info.spki_der, key_pair.public_key_der());
    }

    #[test]
    fn renders_an_explicit_distinguished_name() {
        let key_pair = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".into()]).unwrap();
        params.distinguished_name = DistinguishedName::new();
        let dn = &mut params.distinguished_name;
        dn.push(
            DnType::CountryName,
            DnValue::PrintableString(PrintableString::try_from("DE").unwrap()),
        );
        dn.push(DnType::StateOrProvinceName, "Bayern");
        dn.push(
            DnType::LocalityName,
            DnValue::TeletexString(TeletexString::try_from("Munich").unwrap()),
        );
        dn.push(
            DnType::OrganizationName,
            DnValue::BmpString(BmpString::try_from("Zürich AG").unwrap()),
        );
        dn.push(
            DnType::OrganizationalUnitName,
            DnValue::Ia5String(Ia5String::try_from("ops").unwrap()),
        );
        dn.push(DnType::CommonName, "relay-node");
        dn.push(DnType::CustomDnType(vec![2, 5, 4, 5]), "serial 42");
        dn.push(
            DnType::CustomDnType(vec![1, 2, 840, 113_549, 1, 9, 1]),
            DnValue::UniversalString(UniversalString::try_from("ab").unwrap()),
        );
        let cert = params.self_signed(&key_pair).unwrap();
        let info = parse_certificate(cert.der()).unwrap();
        assert_eq!(info.spki_der, key_pair.public_key_der());
        assert_eq!(
            info.subject,
            "C=DE, ST=Bayern, L=Munich, O=Zürich AG, OU=ops, CN=relay-node, \
             2.5.4.5=serial 42, 1.2.840.113549.1.9.1=#1c080000006100000062"
        );
        assert!(info.subject.contains("CN=relay-node"));
        assert_eq!(info.issuer, info.subject);
    }

    #[test]
    fn reads_hand_made_names_and_version_1_certificates() {
        let issuer = attribute(&[0x55, 0x04, 0x03], tlv(TAG_T61_STRING, b"caf\xe9"));
        let multi = tlv(
            TAG_SET,
            &[
                tlv(
                    TAG_SEQUENCE,
                    &[tlv(TAG_OID, &[0x55, 0x04, 0x0a]), tlv(TAG_UTF8_STRING, b"a,b")].concat(),
                ),
                tlv(
                    TAG_SEQUENCE,
                    &[tlv(TAG_OID, &[0x55, 0x04, 0x0b]), tlv(TAG_UTF8_STRING, b"#x\x1b[2J")].concat(),
                ),
            ]
            .concat(),
        );
        let odd = attribute(&[0x55, 0x04, 0x03], tlv(TAG_INTEGER, &[5]));
        let bad_utf8 = attribute(&[0x55, 0x04, 0x03], tlv(TAG_UTF8_STRING, &[0xff]));
        let subject = [multi, odd, bad_utf8, tlv(TAG_SET, &[])].concat();
        let spki = sample_spki();
        for version in [false, true] {
            let der = hand_made(version, &issuer, &subject, &spki);
            let info = parse_certificate(&der).unwrap();
            assert_eq!(info.issuer, "CN=café");
            assert_eq!(info.subject, "O=a\\,b+OU=\\#x\\1b[2J, CN=#020105, CN=#0c01ff");
            assert_eq!(info.spki_der, spki);
        }
        let empty = hand_made(true, &[], &[], &spki);
        let info = parse_certificate(&empty).unwrap();
        assert_eq!((info.subject.as_str(), info.issuer.as_str()), ("", ""));
    }

    #[test]
    fn accepts_every_long_length_form_up_to_four_bytes() {
        let spki = sample_spki();
        let short = hand_made(true, &[], &[], &spki);
        let (outer, _) = read_tlv(&short, "test").unwrap();
        for count in 1..=4 {
            let der = tlv_long(TAG_SEQUENCE, outer.value, count);
            assert_eq!(parse_certificate(&der).unwrap().spki_der, spki, "{count}");
        }
        // The SPKI itself in long form: the pin covers the bytes exactly as encoded.
        let (spki_inner, _) = read_tlv(&spki, "test").unwrap();
        let long_spki = tlv_long(TAG_SEQUENCE, spki_inner.value, 3);
        let der = hand_made(true, &[], &[], &long_spki);
        assert_eq!(parse_certificate(&der).unwrap().spki_der, long_spki);
        assert_eq!(spki_sha256(&der).unwrap(), sha256(&long_spki));
    }

    #[test]
    fn refuses_broken_lengths() {
        let spki = sample_spki();
        let good = hand_made(true, &[], &[], &spki);
        let (outer, _) = read_tlv(&good, "test").unwrap();

        let mut indefinite = vec![TAG_SEQUENCE, 0x80];
        indefinite.extend_from_slice(outer.value);
        indefinite.extend_from_slice(&[0, 0]);
        assert_eq!(
            parse_certificate(&indefinite),
            Err(X509Error::IndefiniteLength("the Certificate sequence"))
        );

        let mut five = vec![TAG_SEQUENCE, 0x85, 0, 0, 0, 0];
        five.push(outer.value.len() as u8);
        five.extend_from_slice(outer.value);
        assert_eq!(
            parse_certificate(&five),
            Err(X509Error::LengthTooLong("the Certificate sequence"))
        );

        let mut past_end = vec![TAG_SEQUENCE, 0x84, 0xff, 0xff, 0xff, 0xff];
        past_end.extend_from_slice(outer.value);
        assert_eq!(
            parse_certificate(&past_end),
            Err(X509Error::Truncated("the Certificate sequence"))
        );

        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(
            parse_certificate(&trailing),
            Err(X509Error::Malformed("there are bytes after the certificate"))
        );
    }

    #[test]
    fn refuses_what_is_not_a_der_certificate() {
        assert_eq!(parse_certificate(&[]), Err(X509Error::Empty));
        let pem = simple_cert().cert.pem();
        assert_eq!(parse_certificate(pem.as_bytes()), Err(X509Error::Pem));
        assert!(parse_certificate(b"hello").is_err());
        let key = simple_cert().key_pair.public_key_der();
        // An SPKI alone has the wrong shape inside.
        assert!(parse_certificate(&key).is_err());
        let err = parse_certificate(&[0x31, 0x00]).unwrap_err();
        assert_eq!(
            err,
            X509Error::UnexpectedTag {
                expected: "the Certificate sequence",
                found: 0x31
            }
        );
        assert!(err.to_string().contains("0x31"));
    }

    #[test]
    fn every_truncation_of_a_real_certificate_is_refused() {
        let der = simple_cert().cert.der().to_vec();
        for end in 0..der.len() {
            assert!(parse_certificate(&der[..end]).is_err(), "length {end}");
        }
    }

    #[test]
    fn dotted_oids() {
        assert_eq!(dotted_oid(&[0x55, 0x04, 0x05]).unwrap(), "2.5.4.5");
        assert_eq!(
            dotted_oid(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x01]).unwrap(),
            "1.2.840.113549.1.9.1"
        );
        assert_eq!(dotted_oid(&[0x88, 0x37, 0x03]).unwrap(), "2.999.3");
        assert_eq!(dotted_oid(&[0x00]).unwrap(), "0.0");
        assert!(dotted_oid(&[]).is_err());
        assert!(dotted_oid(&[0x55, 0x84]).is_err());
        assert!(dotted_oid(&[0xff; 12]).is_err());
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(
            bytes in proptest::collection::vec(any::<u8>(), 0..600),
        ) {
            let _ = parse_certificate(&bytes);
        }

        #[test]
        fn never_panics_on_der_like_bytes(
            // Sequences and long-form lengths up front get the reader deeper than pure noise.
            head in proptest::sample::select(vec![
                vec![0x30u8], vec![0x30, 0x82], vec![0x30, 0x84], vec![0x30, 0x80], vec![0x31],
            ]),
            tail in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let _ = parse_certificate(&[head, tail].concat());
        }

        #[test]
        fn never_panics_on_mutated_certificates(
            changes in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
            cut in any::<usize>(),
        ) {
            let mut der = simple_cert().cert.der().to_vec();
            for (position, byte) in changes {
                let position = position % der.len();
                der[position] = byte;
            }
            let _ = parse_certificate(&der);
            der.truncate(cut % (der.len() + 1));
            let _ = parse_certificate(&der);
        }

        #[test]
        fn never_panics_on_spliced_certificates(
            position in any::<usize>(),
            inserted in proptest::collection::vec(any::<u8>(), 0..16),
            removed in 0usize..16,
        ) {
            let der = simple_cert().cert.der().to_vec();
            let at = position % (der.len() + 1);
            let end = (at + removed).min(der.len());
            let spliced = [&der[..at], &inserted[..], &der[end..]].concat();
            if let Ok(info) = parse_certificate(&spliced) {
                prop_assert!(!info.spki_der.is_empty());
            }
        }
    }
}
