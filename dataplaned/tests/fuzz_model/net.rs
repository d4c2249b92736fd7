//! Bytes, checksums and a seeded random generator for the fuzzer: nothing here knows sluice.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

pub const ETH: usize = 14;
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

pub fn ip(a: u32) -> Ipv4Addr {
    Ipv4Addr::from(a)
}

pub fn get16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
pub fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}
pub fn get32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
pub fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

/// The two 16-bit words of an address, for checksum updates.
pub fn words32(v: u32) -> [u16; 2] {
    [(v >> 16) as u16, v as u16]
}

/// RFC 1071 one's complement sum of `data` (odd length padded with a zero byte), folded.
pub fn ones_sum(data: &[u8]) -> u16 {
    let mut s: u64 = 0;
    for ch in data.chunks(2) {
        s += if ch.len() == 2 {
            u16::from_be_bytes([ch[0], ch[1]]) as u64
        } else {
            (ch[0] as u64) << 8
        };
    }
    fold(s)
}

fn fold(mut s: u64) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// A checksum from scratch over `data`.
pub fn checksum(data: &[u8]) -> u16 {
    !ones_sum(data)
}

/// RFC 1624 incremental update of checksum field `c` for words `old` replaced by `new`, with
/// the kernel's representation (csum_replace*/inet_proto_csum_replace*: a result of zero is
/// written 0x0000, never 0xffff). `udp`: a result of 0 is written 0xffff (0 means "none").
pub fn csum_update(c: u16, old: &[u16], new: &[u16], udp: bool) -> u16 {
    let mut s: u64 = (!c) as u64;
    for w in old {
        s += (!*w) as u64;
    }
    for w in new {
        s += *w as u64;
    }
    let mut f = fold(s);
    if f == 0 {
        // The kernel's sums carry a negative zero (~csum_unfold() sets the high half): 0 cannot
        // come out of them, 0xffff does.
        f = 0xffff;
    }
    let r = !f;
    if udp && r == 0 {
        0xffff
    } else {
        r
    }
}

/// What completing the checksum over `l4` writes (skb_checksum_help): csum_fold, 0 as 0xffff.
pub fn completion(l4: &[u8]) -> u16 {
    match !ones_sum(l4) {
        0 => 0xffff,
        f => f,
    }
}

/// The value F of the 16-bit field at `field` of `l4` for which completing the checksum over
/// `l4` leaves F in place (bpf/RULES.md, Reject), found by search.
pub fn completion_fixed_point(l4: &[u8], field: usize) -> u16 {
    let mut b = l4.to_vec();
    b[field] = 0;
    b[field + 1] = 0;
    let rest = ones_sum(&b) as u64;
    for f in 0..=u16::MAX {
        let c = match !fold(rest + f as u64) {
            0 => 0xffff,
            x => x,
        };
        if c == f {
            // Second opinion by the plain definition.
            put16(&mut b, field, f);
            assert_eq!(completion(&b), f, "fixed point");
            return f;
        }
    }
    panic!("no checksum completion fixed point")
}

pub fn hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
    s
}

pub fn tcp_flags(f: u8) -> String {
    let mut s = String::new();
    for (bit, c) in [
        (FIN, 'F'),
        (SYN, 'S'),
        (RST, 'R'),
        (PSH, 'P'),
        (ACK, '.'),
        (0x20, 'U'),
        (0x40, 'E'),
        (0x80, 'C'),
    ] {
        if f & bit != 0 {
            s.push(c);
        }
    }
    if s.is_empty() {
        s.push('-');
    }
    s
}

/// A one-line decoding of a frame, for reports (whatever the frame holds).
pub fn describe(f: &[u8]) -> String {
    if f.len() < ETH {
        return format!("{} bytes: runt", f.len());
    }
    let et = get16(f, 12);
    if et != 0x0800 {
        return format!("{} bytes, EtherType {et:#06x}", f.len());
    }
    if f.len() < ETH + 20 {
        return format!("{} bytes, IPv4 header cut at {}", f.len(), f.len() - ETH);
    }
    let vihl = f[ETH];
    let ihl = (vihl & 0xf) as usize * 4;
    let total = get16(f, ETH + 2) as usize;
    let fo = get16(f, ETH + 6);
    let proto = f[ETH + 9];
    let (s, d) = (get32(f, ETH + 12), get32(f, ETH + 16));
    let csum_ok = ihl >= 20 && f.len() >= ETH + ihl && ones_sum(&f[ETH..ETH + ihl]) == 0xffff;
    let mut out = format!(
        "{} bytes, IPv4 v{} ihl {} total {} id {:#06x}{}{} off {} ttl {} proto {} ipcsum {}: {} > {}",
        f.len(),
        vihl >> 4,
        ihl,
        total,
        get16(f, ETH + 4),
        if fo & 0x4000 != 0 { " DF" } else { "" },
        if fo & 0x2000 != 0 { " MF" } else { "" },
        fo & 0x1fff,
        f[ETH + 8],
        proto,
        if csum_ok { "ok" } else { "BAD" },
        ip(s),
        ip(d)
    );
    let l4 = ETH + ihl;
    let end = (ETH + total).min(f.len());
    if ihl < 20 || l4 > end || fo & 0x1fff != 0 {
        return out;
    }
    let seg = &f[l4..end];
    let pseudo_ok = |proto: u8| {
        let mut p = Vec::with_capacity(12 + seg.len());
        p.extend_from_slice(&f[ETH + 12..ETH + 20]);
        p.extend_from_slice(&[0, proto]);
        p.extend_from_slice(&(seg.len() as u16).to_be_bytes());
        p.extend_from_slice(seg);
        ones_sum(&p) == 0xffff
    };
    match proto {
        TCP if seg.len() >= 20 => {
            let _ = write!(
                out,
                " TCP {} > {} [{}] csum {:#06x} {}{}",
                get16(seg, 0),
                get16(seg, 2),
                tcp_flags(seg[13]),
                get16(seg, 16),
                if pseudo_ok(TCP) { "ok" } else { "bad/partial" },
                if fo & 0x2000 != 0 {
                    " (first fragment)"
                } else {
                    ""
                }
            );
        }
        UDP if seg.len() >= 8 => {
            let c = get16(seg, 6);
            let _ = write!(
                out,
                " UDP {} > {} len {} csum {:#06x} {}",
                get16(seg, 0),
                get16(seg, 2),
                get16(seg, 4),
                c,
                if c == 0 {
                    "none"
                } else if pseudo_ok(UDP) {
                    "ok"
                } else {
                    "bad/partial"
                }
            );
        }
        ICMP if seg.len() >= 8 => {
            let _ = write!(
                out,
                " ICMP type {} code {} csum {}",
                seg[0],
                seg[1],
                if ones_sum(seg) == 0xffff { "ok" } else { "BAD" }
            );
            let q = &seg[8..];
            if q.len() >= 20 && q[0] >> 4 == 4 {
                let qihl = (q[0] & 0xf) as usize * 4;
                let _ = write!(
                    out,
                    " quoting [{} > {} proto {} ihl {} ipcsum {}",
                    ip(get32(q, 12)),
                    ip(get32(q, 16)),
                    q[9],
                    qihl,
                    if qihl >= 20 && q.len() >= qihl && ones_sum(&q[..qihl]) == 0xffff {
                        "ok"
                    } else {
                        "bad"
                    }
                );
                if qihl >= 20 && q.len() >= qihl + 4 {
                    let _ = write!(out, " ports {} > {}", get16(q, qihl), get16(q, qihl + 2));
                }
                let _ = write!(out, ", {} bytes]", q.len());
            } else {
                let _ = write!(out, " quoting {} bytes", q.len());
            }
        }
        _ => {
            let _ = write!(out, " {} bytes of payload", seg.len());
        }
    }
    out
}

/// SplitMix64: small, seeded, reproducible.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5eed_5eed_d00d_f00d)
    }
    /// A generator for the `n`-th part of a seed's run (scenario n replays on its own).
    pub fn derive(seed: u64, n: u64) -> Rng {
        let mut r = Rng::new(seed.wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
        r.u64();
        r
    }
    pub fn u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn u32(&mut self) -> u32 {
        self.u64() as u32
    }
    pub fn u16(&mut self) -> u16 {
        self.u64() as u16
    }
    pub fn u8(&mut self) -> u8 {
        self.u64() as u8
    }
    /// Uniform in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        assert!(n > 0);
        (self.u64() % n as u64) as usize
    }
    /// Uniform in [lo, hi].
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.u64() % (hi - lo + 1)
    }
    /// True with probability p (percent).
    pub fn pct(&mut self, p: u32) -> bool {
        self.below(100) < p as usize
    }
    pub fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }
    /// An index chosen by weight.
    pub fn weighted(&mut self, w: &[u32]) -> usize {
        let total: u32 = w.iter().sum();
        let mut x = self.below(total as usize) as u32;
        for (i, &wi) in w.iter().enumerate() {
            if x < wi {
                return i;
            }
            x -= wi;
        }
        unreachable!()
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.u8()).collect()
    }
}
