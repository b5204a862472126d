#!/usr/bin/env python3
"""A Squid NTLM authentication helper (Squid's stateful helper protocol) that checks the
client's NTLMv2 answer against one known account, for the proxy tests.

Squid's own ntlm_fake_auth accepts any answer; this one computes the NTLMv2 proof from the
password as a domain controller would and refuses anything else: a wrong password, another
user, an LM or NTLMv1 answer. Every answer it checks is appended to the attempts file, one
line each ("ok", "wrong", "v1"), so a test can count what reached the "domain".

usage: ntlm_helper.py DOMAIN USER PASSWORD_FILE ATTEMPTS_FILE
"""

import base64
import hashlib
import hmac
import os
import struct
import sys
import time

MASK = 0xFFFFFFFF


def md4(data: bytes) -> bytes:
    """MD4 (RFC 1320); Python's hashlib offers it only with OpenSSL's legacy provider."""

    def rotl(x, n):
        x &= MASK
        return ((x << n) | (x >> (32 - n))) & MASK

    msg = bytearray(data)
    bit_len = (8 * len(data)) & 0xFFFFFFFFFFFFFFFF
    msg.append(0x80)
    while len(msg) % 64 != 56:
        msg.append(0)
    msg += struct.pack("<Q", bit_len)
    a, b, c, d = 0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476
    for off in range(0, len(msg), 64):
        x = struct.unpack("<16I", bytes(msg[off:off + 64]))
        aa, bb, cc, dd = a, b, c, d
        f = lambda x_, y, z: (x_ & y) | (~x_ & z)
        g = lambda x_, y, z: (x_ & y) | (x_ & z) | (y & z)
        h = lambda x_, y, z: x_ ^ y ^ z
        for i in (0, 4, 8, 12):
            a = rotl(a + f(b, c, d) + x[i], 3)
            d = rotl(d + f(a, b, c) + x[i + 1], 7)
            c = rotl(c + f(d, a, b) + x[i + 2], 11)
            b = rotl(b + f(c, d, a) + x[i + 3], 19)
        for i in (0, 1, 2, 3):
            a = rotl(a + g(b, c, d) + x[i] + 0x5A827999, 3)
            d = rotl(d + g(a, b, c) + x[i + 4] + 0x5A827999, 5)
            c = rotl(c + g(d, a, b) + x[i + 8] + 0x5A827999, 9)
            b = rotl(b + g(c, d, a) + x[i + 12] + 0x5A827999, 13)
        for i in (0, 2, 1, 3):
            a = rotl(a + h(b, c, d) + x[i] + 0x6ED9EBA1, 3)
            d = rotl(d + h(a, b, c) + x[i + 8] + 0x6ED9EBA1, 9)
            c = rotl(c + h(d, a, b) + x[i + 4] + 0x6ED9EBA1, 11)
            b = rotl(b + h(c, d, a) + x[i + 12] + 0x6ED9EBA1, 15)
        a, b, c, d = (a + aa) & MASK, (b + bb) & MASK, (c + cc) & MASK, (d + dd) & MASK
    return struct.pack("<4I", a, b, c, d)


def av_pair(kind: int, value: bytes) -> bytes:
    return struct.pack("<HH", kind, len(value)) + value


def challenge_message(domain: str, server_challenge: bytes) -> bytes:
    """An NTLM CHALLENGE_MESSAGE (type 2) offering NTLMv2 with target information."""
    target = domain.encode("utf-16-le")
    filetime = int((time.time() + 11644473600) * 10_000_000)
    info = (
        av_pair(2, target)
        + av_pair(1, b"P\x00R\x00O\x00X\x00Y\x00")
        + av_pair(4, (domain.lower() + ".test").encode("utf-16-le"))
        + av_pair(3, ("proxy." + domain.lower() + ".test").encode("utf-16-le"))
        + av_pair(7, struct.pack("<Q", filetime))
        + av_pair(0, b"")
    )
    flags = (
        0x00000001  # UNICODE
        | 0x00000004  # REQUEST_TARGET
        | 0x00000200  # NTLM
        | 0x00008000  # ALWAYS_SIGN
        | 0x00010000  # TARGET_TYPE_DOMAIN
        | 0x00080000  # EXTENDED_SESSIONSECURITY
        | 0x00800000  # TARGET_INFO
        | 0x02000000  # VERSION
        | 0x20000000  # 128
        | 0x40000000  # KEY_EXCH
        | 0x80000000  # 56
    )
    header_len = 56
    out = b"NTLMSSP\x00" + struct.pack("<I", 2)
    out += struct.pack("<HHI", len(target), len(target), header_len)
    out += struct.pack("<I", flags) + server_challenge + b"\x00" * 8
    out += struct.pack("<HHI", len(info), len(info), header_len + len(target))
    out += bytes([10, 0]) + struct.pack("<H", 20348) + b"\x00\x00\x00\x0f"
    return out + target + info


def field(msg: bytes, offset: int) -> bytes:
    length, _, start = struct.unpack_from("<HHI", msg, offset)
    return msg[start:start + length]


def check(msg: bytes, server_challenge: bytes, domain: str, user: str, password: str):
    """('ok', 'DOMAIN\\user') when the AUTHENTICATE_MESSAGE proves the password, else
    (kind, reason)."""
    if msg[:8] != b"NTLMSSP\x00" or struct.unpack_from("<I", msg, 8)[0] != 3:
        return "malformed", "not an NTLM AUTHENTICATE message"
    nt = field(msg, 20)
    got_domain = field(msg, 28).decode("utf-16-le", "replace")
    got_user = field(msg, 36).decode("utf-16-le", "replace")
    if len(nt) <= 24:
        return "v1", "NTLMv1 and LM answers are refused"
    if got_user.lower() != user.lower() or got_domain.lower() != domain.lower():
        return "wrong", "unknown user %s\\%s" % (got_domain, got_user)
    nt_hash = md4(password.encode("utf-16-le"))
    key = hmac.new(nt_hash, (got_user.upper() + got_domain).encode("utf-16-le"), hashlib.md5).digest()
    proof = hmac.new(key, server_challenge + nt[16:], hashlib.md5).digest()
    if not hmac.compare_digest(proof, nt[:16]):
        return "wrong", "wrong password for %s\\%s" % (got_domain, got_user)
    return "ok", "%s\\%s" % (got_domain, got_user)


def main() -> None:
    domain, user, password_file, attempts = sys.argv[1:5]
    server_challenge = b""
    for line in sys.stdin:
        line = line.strip()
        command, _, blob = line.partition(" ")
        if command == "YR":
            server_challenge = os.urandom(8)
            token = base64.b64encode(challenge_message(domain, server_challenge)).decode()
            print("TT " + token, flush=True)
        elif command == "KK" and server_challenge:
            with open(password_file, encoding="utf-8") as f:
                password = f.read().strip()
            kind, said = check(base64.b64decode(blob), server_challenge, domain, user, password)
            with open(attempts, "a", encoding="utf-8") as f:
                f.write(kind + "\n")
            server_challenge = b""
            if kind == "ok":
                print("AF " + said, flush=True)
            else:
                print("NA " + said, flush=True)
        else:
            print("BH unexpected " + command, flush=True)


if __name__ == "__main__":
    main()
