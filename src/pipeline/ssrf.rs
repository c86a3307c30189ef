//! Server-side request forgery (SSRF) protection for webhook delivery.
//!
//! Strangers choose the URLs that uploadhook POSTs to, so without a check
//! anyone could make it call `http://169.254.169.254/` (cloud metadata),
//! `http://127.0.0.1:6379/` or a service inside the private network. The
//! rule is one pure function, [`classify`], which says whether an address
//! is in a range that webhooks must never reach, and an [`AllowList`] of
//! CIDRs that the operator opens as exceptions (`delivery.allow_cidrs`).
//!
//! The check runs on the addresses actually connected to, not on the name
//! in the URL: [`GuardedResolver`] is the delivery client's DNS resolver,
//! and it drops every blocked address it resolves. A name that resolved to
//! a public address when the webhook was created and to `127.0.0.1` at
//! delivery (DNS rebinding) is therefore refused at delivery. reqwest does
//! not call the resolver for a URL whose host is an IP literal, so
//! `DeliveryClient::post` checks those itself with [`AllowList::check`].
//! Redirects are never followed and proxies are never used, so no other
//! address is ever connected to.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

/// A range that webhooks may not reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Range {
    /// 127.0.0.0/8, ::1.
    Loopback,
    /// 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16 (RFC 1918).
    Private,
    /// 169.254.0.0/16, which holds the cloud metadata service.
    LinkLocal,
    /// 100.64.0.0/10, carrier-grade NAT (RFC 6598).
    SharedCgnat,
    /// 0.0.0.0, ::.
    Unspecified,
    /// 0.0.0.0/8.
    ThisNetwork,
    /// 255.255.255.255.
    Broadcast,
    /// 224.0.0.0/4, ff00::/8.
    Multicast,
    /// 192.0.0.0/24 (RFC 6890).
    IetfProtocol,
    /// 192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32.
    Documentation,
    /// 198.18.0.0/15 (RFC 2544).
    Benchmarking,
    /// 240.0.0.0/4.
    Reserved,
    /// fc00::/7.
    UniqueLocal,
    /// fe80::/10.
    Ipv6LinkLocal,
    /// fec0::/10, deprecated but still routed by some stacks.
    SiteLocal,
    /// 100::/64 (RFC 6666).
    DiscardOnly,
    /// 64:ff9b:1::/48, NAT64 for a network's own use (RFC 8215): where it
    /// leads depends on that network, so it is never a public target.
    LocalNat64,
}

impl Range {
    /// A short name for messages ("loopback", "private (RFC 1918)", …).
    pub fn name(self) -> &'static str {
        match self {
            Range::Loopback => "loopback",
            Range::Private => "private (RFC 1918)",
            Range::LinkLocal => "link-local",
            Range::SharedCgnat => "shared (CGNAT)",
            Range::Unspecified => "unspecified",
            Range::ThisNetwork => "\"this network\"",
            Range::Broadcast => "broadcast",
            Range::Multicast => "multicast",
            Range::IetfProtocol => "IETF protocol assignment",
            Range::Documentation => "documentation",
            Range::Benchmarking => "benchmarking",
            Range::Reserved => "reserved",
            Range::UniqueLocal => "unique-local",
            Range::Ipv6LinkLocal => "IPv6 link-local",
            Range::SiteLocal => "site-local",
            Range::DiscardOnly => "discard-only",
            Range::LocalNat64 => "local-use NAT64",
        }
    }
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An address that webhooks may not reach, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{ip} is a {range} address")]
pub struct Blocked {
    pub ip: IpAddr,
    pub range: Range,
}

/// Whether webhooks may reach `ip`, with no exceptions. IPv6 forms that
/// carry an IPv4 address (mapped, compatible, NAT64, 6to4, translated) are
/// judged by the IPv4 address they carry.
pub fn classify(ip: IpAddr) -> Result<(), Blocked> {
    let range = match ip {
        IpAddr::V4(v4) => range_v4(v4),
        IpAddr::V6(v6) => range_v6(v6),
    };
    match range {
        None => Ok(()),
        Some(range) => Err(Blocked { ip, range }),
    }
}

fn range_v4(ip: Ipv4Addr) -> Option<Range> {
    let [a, b, c, _] = ip.octets();
    Some(match (a, b, c) {
        _ if ip.is_unspecified() => Range::Unspecified,
        _ if ip.is_broadcast() => Range::Broadcast,
        (0, _, _) => Range::ThisNetwork,
        (10, _, _) => Range::Private,
        (100, 64..=127, _) => Range::SharedCgnat,
        (127, _, _) => Range::Loopback,
        (169, 254, _) => Range::LinkLocal,
        (172, 16..=31, _) => Range::Private,
        (192, 0, 0) => Range::IetfProtocol,
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => Range::Documentation,
        (192, 168, _) => Range::Private,
        (198, 18..=19, _) => Range::Benchmarking,
        (224..=239, _, _) => Range::Multicast,
        (240..=255, _, _) => Range::Reserved,
        _ => return None,
    })
}

fn range_v6(ip: Ipv6Addr) -> Option<Range> {
    if ip.is_unspecified() {
        return Some(Range::Unspecified);
    }
    if ip.is_loopback() {
        return Some(Range::Loopback);
    }
    if let Some(v4) = embedded_v4(ip) {
        return range_v4(v4);
    }
    let s = ip.segments();
    Some(match s[0] {
        0x0100 if s[1..4] == [0, 0, 0] => Range::DiscardOnly,
        0x0064 if s[1] == 0xff9b && s[2] == 1 => Range::LocalNat64,
        0x2001 if s[1] == 0x0db8 => Range::Documentation,
        x if x & 0xfe00 == 0xfc00 => Range::UniqueLocal,
        x if x & 0xffc0 == 0xfe80 => Range::Ipv6LinkLocal,
        x if x & 0xffc0 == 0xfec0 => Range::SiteLocal,
        x if x & 0xff00 == 0xff00 => Range::Multicast,
        _ => return None,
    })
}

/// The IPv4 address inside an IPv6 one, for the forms that lead to it:
/// IPv4-mapped `::ffff:a.b.c.d`, IPv4-compatible `::a.b.c.d` (deprecated),
/// IPv4-translated `::ffff:0:a.b.c.d`, NAT64 `64:ff9b::a.b.c.d` and 6to4
/// `2002:aabb:ccdd::/48`.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let o = ip.octets();
    let low = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    match s {
        [0, 0, 0, 0, 0, 0xffff, _, _] => Some(low),
        // `::` and `::1` are handled before; everything else in ::/96 is
        // the compatible form.
        [0, 0, 0, 0, 0, 0, _, _] => Some(low),
        [0, 0, 0, 0, 0xffff, 0, _, _] => Some(low),
        [0x0064, 0xff9b, 0, 0, 0, 0, _, _] => Some(low),
        [0x2002, _, _, ..] => Some(Ipv4Addr::new(o[2], o[3], o[4], o[5])),
        _ => None,
    }
}

/// The address a URL's host names literally, if it does. The URL parser
/// has already turned every IPv4 spelling (`2130706433`, `0x7f.1`, …) into
/// a dotted quad and put IPv6 in brackets, and a domain never parses as an
/// address, so this agrees with what reqwest connects to without
/// resolving.
pub fn literal_host(url: &reqwest::Url) -> Option<IpAddr> {
    let host = url.host_str()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    host.parse().ok()
}

/// One network in CIDR notation: `10.1.0.0/16`, `::1/128`. A bare address
/// is the network of that one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let net: IpAddr = addr
            .parse()
            .map_err(|_| format!("`{s}` is not an IP address or CIDR like 10.1.0.0/16"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max && !p.starts_with('+') => n,
                _ => return Err(format!("`{s}` has a prefix length outside 0-{max}")),
            },
        };
        let cidr = Cidr { net, prefix };
        if cidr.network() != net {
            return Err(format!(
                "`{s}` has bits set past its prefix (the network is {}/{prefix})",
                cidr.network()
            ));
        }
        Ok(cidr)
    }

    fn network(&self) -> IpAddr {
        match self.net {
            IpAddr::V4(v4) => IpAddr::V4(Ipv4Addr::from_bits(v4.to_bits() & mask_u32(self.prefix))),
            IpAddr::V6(v6) => {
                IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & mask_u128(self.prefix)))
            }
        }
    }

    /// Whether `ip` is in this network. An IPv4-mapped IPv6 address is the
    /// IPv4 address it maps.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                ip.to_bits() & mask_u32(self.prefix) == net.to_bits()
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                ip.to_bits() & mask_u128(self.prefix) == net.to_bits()
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

fn mask_u32(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask_u128(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

/// The operator's exceptions to [`classify`] (`delivery.allow_cidrs`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList(Vec<Cidr>);

impl AllowList {
    /// Parses every entry; the error names the bad one.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<AllowList, String> {
        entries
            .iter()
            .map(|e| Cidr::parse(e.as_ref()))
            .collect::<Result<Vec<_>, _>>()
            .map(AllowList)
    }

    /// 127.0.0.1/32 and ::1/128: the embedded default's development rule.
    pub fn loopback() -> AllowList {
        AllowList(vec![
            Cidr {
                net: IpAddr::V4(Ipv4Addr::LOCALHOST),
                prefix: 32,
            },
            Cidr {
                net: IpAddr::V6(Ipv6Addr::LOCALHOST),
                prefix: 128,
            },
        ])
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(ip))
    }

    /// Whether webhooks may reach `ip`: listed here, or not blocked.
    pub fn check(&self, ip: IpAddr) -> Result<(), Blocked> {
        if self.contains(ip) {
            return Ok(());
        }
        classify(ip)
    }

    /// The addresses of `host` that webhooks may reach, in their order.
    pub fn filter(&self, host: &str, addrs: Vec<SocketAddr>) -> Result<Vec<SocketAddr>, Refused> {
        let mut ranges = Vec::new();
        let allowed: Vec<SocketAddr> = addrs
            .into_iter()
            .filter(|a| match self.check(a.ip()) {
                Ok(()) => true,
                Err(b) => {
                    if !ranges.contains(&b.range) {
                        ranges.push(b.range);
                    }
                    false
                }
            })
            .collect();
        if allowed.is_empty() {
            return Err(if ranges.is_empty() {
                Refused::NoAddresses {
                    host: host.to_string(),
                }
            } else {
                Refused::Blocked {
                    host: host.to_string(),
                    ranges,
                }
            });
        }
        Ok(allowed)
    }
}

impl fmt::Display for AllowList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let all: Vec<String> = self.0.iter().map(Cidr::to_string).collect();
        write!(f, "[{}]", all.join(", "))
    }
}

/// Why a name gives no address to connect to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("blocked: {host} resolves only to {} addresses", join(ranges))]
    Blocked { host: String, ranges: Vec<Range> },
    #[error("{host} resolves to no address")]
    NoAddresses { host: String },
}

fn join(ranges: &[Range]) -> String {
    let names: Vec<&str> = ranges.iter().map(|r| r.name()).collect();
    names.join(", ")
}

/// The delivery client's DNS resolver: the system resolver (through
/// tokio's `lookup_host`), minus every address the allow list refuses.
#[derive(Debug, Clone)]
pub struct GuardedResolver {
    allow: Arc<AllowList>,
}

impl GuardedResolver {
    pub fn new(allow: Arc<AllowList>) -> Self {
        Self { allow }
    }
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow = self.allow.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            // Port 0: reqwest puts the URL's port in.
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed = allow.filter(&host, addrs)?;
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn range(s: &str) -> Option<Range> {
        classify(ip(s)).err().map(|b| b.range)
    }

    #[test]
    fn public_addresses_pass() {
        for s in [
            "1.1.1.1",
            "8.8.8.8",
            "93.184.215.14",
            "2606:4700:4700::1111",
            "2a00:1450:4001:82b::200e",
            "::ffff:8.8.8.8",
            "64:ff9b::8.8.8.8",
            "2002:0808:0808::1",
            "::8.8.8.8",
        ] {
            assert_eq!(range(s), None, "{s}");
        }
    }

    #[test]
    fn ipv4_ranges_and_their_boundaries() {
        use Range::*;
        let cases: &[(&str, Option<Range>)] = &[
            ("0.0.0.0", Some(Unspecified)),
            ("0.0.0.1", Some(ThisNetwork)),
            ("0.255.255.255", Some(ThisNetwork)),
            ("1.0.0.0", None),
            ("9.255.255.255", None),
            ("10.0.0.0", Some(Private)),
            ("10.255.255.255", Some(Private)),
            ("11.0.0.0", None),
            ("100.63.255.255", None),
            ("100.64.0.0", Some(SharedCgnat)),
            ("100.127.255.255", Some(SharedCgnat)),
            ("100.128.0.0", None),
            ("126.255.255.255", None),
            ("127.0.0.0", Some(Loopback)),
            ("127.0.0.1", Some(Loopback)),
            ("127.255.255.255", Some(Loopback)),
            ("128.0.0.0", None),
            ("169.253.255.255", None),
            ("169.254.0.0", Some(LinkLocal)),
            ("169.254.169.254", Some(LinkLocal)),
            ("169.254.255.255", Some(LinkLocal)),
            ("169.255.0.0", None),
            ("172.15.255.255", None),
            ("172.16.0.0", Some(Private)),
            ("172.31.255.255", Some(Private)),
            ("172.32.0.0", None),
            ("191.255.255.255", None),
            ("192.0.0.0", Some(IetfProtocol)),
            ("192.0.0.255", Some(IetfProtocol)),
            ("192.0.1.0", None),
            ("192.0.2.0", Some(Documentation)),
            ("192.0.2.255", Some(Documentation)),
            ("192.0.3.0", None),
            ("192.167.255.255", None),
            ("192.168.0.0", Some(Private)),
            ("192.168.255.255", Some(Private)),
            ("192.169.0.0", None),
            ("198.17.255.255", None),
            ("198.18.0.0", Some(Benchmarking)),
            ("198.19.255.255", Some(Benchmarking)),
            ("198.20.0.0", None),
            ("198.51.99.255", None),
            ("198.51.100.0", Some(Documentation)),
            ("198.51.100.255", Some(Documentation)),
            ("198.51.101.0", None),
            ("203.0.112.255", None),
            ("203.0.113.0", Some(Documentation)),
            ("203.0.113.255", Some(Documentation)),
            ("203.0.114.0", None),
            ("223.255.255.255", None),
            ("224.0.0.0", Some(Multicast)),
            ("239.255.255.255", Some(Multicast)),
            ("240.0.0.0", Some(Reserved)),
            ("255.255.255.254", Some(Reserved)),
            ("255.255.255.255", Some(Broadcast)),
        ];
        for (s, want) in cases {
            assert_eq!(range(s), *want, "{s}");
        }
    }

    #[test]
    fn ipv6_ranges_and_their_boundaries() {
        use Range::*;
        let cases: &[(&str, Option<Range>)] = &[
            ("::", Some(Unspecified)),
            ("::1", Some(Loopback)),
            ("::2", Some(ThisNetwork)), // compatible form of 0.0.0.2
            ("100::", Some(DiscardOnly)),
            ("100::ffff:ffff:ffff:ffff", Some(DiscardOnly)),
            ("100:0:0:1::", None),
            ("64:ff9b:1::", Some(LocalNat64)),
            ("64:ff9b:1:ffff::1", Some(LocalNat64)),
            ("64:ff9b:2::", None),
            ("2001:db7:ffff:ffff::", None),
            ("2001:db8::", Some(Documentation)),
            (
                "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff",
                Some(Documentation),
            ),
            ("2001:db9::", None),
            ("fbff:ffff::", None),
            ("fc00::", Some(UniqueLocal)),
            ("fd12:3456:789a::1", Some(UniqueLocal)),
            ("fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Some(UniqueLocal)),
            ("fe00::", None),
            ("fe7f:ffff::", None),
            ("fe80::", Some(Ipv6LinkLocal)),
            ("fe80::1%1".split('%').next().unwrap(), Some(Ipv6LinkLocal)),
            (
                "febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                Some(Ipv6LinkLocal),
            ),
            ("fec0::", Some(SiteLocal)),
            ("feff:ffff::", Some(SiteLocal)),
            ("ff00::", Some(Multicast)),
            ("ff02::1", Some(Multicast)),
            ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Some(Multicast)),
        ];
        for (s, want) in cases {
            assert_eq!(range(s), *want, "{s}");
        }
    }

    #[test]
    fn ipv6_forms_carrying_ipv4_are_judged_by_the_ipv4() {
        use Range::*;
        let cases: &[(&str, Option<Range>)] = &[
            // IPv4-mapped.
            ("::ffff:127.0.0.1", Some(Loopback)),
            ("::ffff:7f00:1", Some(Loopback)),
            ("::ffff:10.0.0.1", Some(Private)),
            ("::ffff:169.254.169.254", Some(LinkLocal)),
            ("::ffff:0.0.0.0", Some(Unspecified)),
            ("::ffff:255.255.255.255", Some(Broadcast)),
            ("::ffff:172.15.255.255", None),
            ("::ffff:172.16.0.0", Some(Private)),
            // IPv4-compatible.
            ("::127.0.0.1", Some(Loopback)),
            ("::192.168.1.1", Some(Private)),
            ("::100.64.0.0", Some(SharedCgnat)),
            ("::100.63.255.255", None),
            // IPv4-translated.
            ("::ffff:0:10.0.0.1", Some(Private)),
            // NAT64.
            ("64:ff9b::127.0.0.1", Some(Loopback)),
            ("64:ff9b::169.254.169.254", Some(LinkLocal)),
            ("64:ff9b::1.1.1.1", None),
            // 6to4.
            ("2002:7f00:1::", Some(Loopback)),
            ("2002:a9fe:a9fe::1", Some(LinkLocal)),
            ("2002:c0a8:101::", Some(Private)),
        ];
        for (s, want) in cases {
            assert_eq!(range(s), *want, "{s}");
        }
    }

    #[test]
    fn literal_hosts_in_every_spelling() {
        let lit = |u: &str| literal_host(&reqwest::Url::parse(u).unwrap());
        assert_eq!(lit("http://127.0.0.1:9/h"), Some(ip("127.0.0.1")));
        assert_eq!(lit("http://2130706433/"), Some(ip("127.0.0.1")));
        assert_eq!(lit("http://0x7f.1/"), Some(ip("127.0.0.1")));
        assert_eq!(lit("http://017700000001/"), Some(ip("127.0.0.1")));
        assert_eq!(lit("https://[::1]:8443/"), Some(ip("::1")));
        assert_eq!(
            lit("http://[::ffff:169.254.169.254]/"),
            Some(ip("::ffff:169.254.169.254"))
        );
        assert_eq!(lit("http://localhost:9/"), None);
        assert_eq!(lit("http://example.com/"), None);
        assert_eq!(lit("http://127.0.0.1.nip.io/"), None);
    }

    #[test]
    fn blocked_names_the_range() {
        let b = classify(ip("169.254.169.254")).unwrap_err();
        assert_eq!(b.to_string(), "169.254.169.254 is a link-local address");
        let b = classify(ip("172.16.0.1")).unwrap_err();
        assert_eq!(b.to_string(), "172.16.0.1 is a private (RFC 1918) address");
    }

    #[test]
    fn cidrs_parse() {
        assert_eq!(
            Cidr::parse("10.1.0.0/16").unwrap().to_string(),
            "10.1.0.0/16"
        );
        assert_eq!(
            Cidr::parse("127.0.0.1").unwrap().to_string(),
            "127.0.0.1/32"
        );
        assert_eq!(Cidr::parse(" ::1/128 ").unwrap().to_string(), "::1/128");
        assert_eq!(Cidr::parse("0.0.0.0/0").unwrap().to_string(), "0.0.0.0/0");
        assert_eq!(Cidr::parse("::/0").unwrap().to_string(), "::/0");
        assert_eq!(Cidr::parse("fd00::/8").unwrap().to_string(), "fd00::/8");
        for bad in [
            "",
            "/8",
            "10.0.0.0/",
            "10.0.0.0/33",
            "10.0.0.0/+8",
            "10.0.0.0/-1",
            "::/129",
            "10.0.0/8",
            "example.com/32",
            "10.1.2.3/16",
            "fd00::1/8",
            "10.0.0.0/8/8",
        ] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
        let err = Cidr::parse("10.1.2.3/16").unwrap_err();
        assert!(err.contains("10.1.0.0/16"), "{err}");
    }

    #[test]
    fn cidrs_match_at_their_edges() {
        let c = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(c.contains(ip("10.1.0.0")));
        assert!(c.contains(ip("10.1.255.255")));
        assert!(!c.contains(ip("10.0.255.255")));
        assert!(!c.contains(ip("10.2.0.0")));
        assert!(c.contains(ip("::ffff:10.1.2.3")), "mapped form");
        assert!(
            !c.contains(ip("::a01:203")),
            "compatible form is not mapped"
        );
        let any4 = Cidr::parse("0.0.0.0/0").unwrap();
        assert!(any4.contains(ip("255.255.255.255")));
        assert!(!any4.contains(ip("::1")));
        let one = Cidr::parse("127.0.0.1/32").unwrap();
        assert!(one.contains(ip("127.0.0.1")));
        assert!(!one.contains(ip("127.0.0.2")));
        let v6 = Cidr::parse("fd00:1::/32").unwrap();
        assert!(v6.contains(ip("fd00:1:ffff::1")));
        assert!(!v6.contains(ip("fd00:2::")));
        assert!(!v6.contains(ip("10.0.0.1")));
        let host6 = Cidr::parse("::1/128").unwrap();
        assert!(host6.contains(ip("::1")));
        assert!(!host6.contains(ip("::2")));
    }

    #[test]
    fn allow_list_opens_exceptions_only() {
        let allow = AllowList::parse(&["127.0.0.1/32", "10.1.0.0/16", "::1/128"]).unwrap();
        assert!(allow.check(ip("127.0.0.1")).is_ok());
        assert!(allow.check(ip("::ffff:127.0.0.1")).is_ok());
        assert!(allow.check(ip("::1")).is_ok());
        assert!(allow.check(ip("10.1.200.3")).is_ok());
        assert_eq!(
            allow.check(ip("127.0.0.2")).unwrap_err().range,
            Range::Loopback
        );
        assert_eq!(
            allow.check(ip("10.2.0.1")).unwrap_err().range,
            Range::Private
        );
        assert_eq!(
            allow.check(ip("169.254.169.254")).unwrap_err().range,
            Range::LinkLocal
        );
        assert!(allow.check(ip("8.8.8.8")).is_ok());
        assert!(AllowList::default().check(ip("127.0.0.1")).is_err());
        let err = AllowList::parse(&["10.0.0.0/8", "nope"]).unwrap_err();
        assert!(err.contains("`nope`"), "{err}");
        assert_eq!(AllowList::loopback().to_string(), "[127.0.0.1/32, ::1/128]");
    }

    #[test]
    fn resolved_addresses_are_filtered() {
        let sa = |s: &str| SocketAddr::new(ip(s), 0);
        let none = AllowList::default();
        assert_eq!(
            none.filter(
                "mixed.example",
                vec![sa("10.0.0.1"), sa("8.8.8.8"), sa("::1")]
            ),
            Ok(vec![sa("8.8.8.8")])
        );
        let err = none
            .filter("localhost", vec![sa("::1"), sa("127.0.0.1")])
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "blocked: localhost resolves only to loopback addresses"
        );
        let err = none
            .filter(
                "rebind.example",
                vec![sa("127.0.0.1"), sa("169.254.169.254"), sa("127.0.0.2")],
            )
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "blocked: rebind.example resolves only to loopback, link-local addresses"
        );
        assert!(matches!(
            none.filter("empty.example", vec![]),
            Err(Refused::NoAddresses { .. })
        ));
        let lo = AllowList::loopback();
        assert_eq!(
            lo.filter(
                "localhost",
                vec![sa("::1"), sa("127.0.0.1"), sa("10.0.0.1")]
            ),
            Ok(vec![sa("::1"), sa("127.0.0.1")])
        );
    }
}
