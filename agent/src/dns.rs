//! DNS answers captured in the kernel → ip→name cache, so a connect to 10.96.0.1 reads as
//! `kubernetes.default.svc.cluster.local`.

use std::net::IpAddr;

use foldhash::{HashMap, HashMapExt};

use simple_dns::{Packet, rdata::RData};

use crate::event::DnsAnswer;

/// The name the client asked for and every address the answer gave for it (CNAME chains
/// are followed: the asked name is what the workload meant to reach). `None` when the
/// payload is not a DNS response with addresses.
pub fn parse_answer(payload: &[u8]) -> Option<DnsAnswer> {
    let packet = Packet::parse(payload).ok()?;
    let question = packet.questions.first()?;
    let name = question.qname.to_string();
    let mut addrs = Vec::new();
    let mut ttl = u32::MAX;
    for rr in &packet.answers {
        let addr = match &rr.rdata {
            RData::A(a) => IpAddr::from(std::net::Ipv4Addr::from(a.address)),
            RData::AAAA(a) => IpAddr::from(std::net::Ipv6Addr::from(a.address)),
            _ => continue,
        };
        addrs.push(addr);
        ttl = ttl.min(rr.ttl);
    }
    if addrs.is_empty() {
        return None;
    }
    Some(DnsAnswer {
        name,
        addrs,
        ttl,
        server: None,
    })
}

/// Bounded ip→name cache honouring answer TTLs (with a floor, since clients cache too).
pub struct NameCache {
    names: HashMap<IpAddr, (String, i64)>,
    max: usize,
    min_ttl_ns: i64,
}

impl NameCache {
    pub fn new(max: usize) -> Self {
        NameCache {
            names: HashMap::new(),
            max,
            min_ttl_ns: 60_000_000_000,
        }
    }

    pub fn insert(&mut self, answer: &DnsAnswer, now_ns: i64) {
        let ttl_ns = (answer.ttl as i64)
            .saturating_mul(1_000_000_000)
            .max(self.min_ttl_ns);
        if self.names.len() + answer.addrs.len() > self.max {
            self.names.retain(|_, (_, exp)| *exp > now_ns);
        }
        for a in &answer.addrs {
            if self.names.len() >= self.max && !self.names.contains_key(a) {
                break;
            }
            self.names
                .insert(*a, (answer.name.clone(), now_ns.saturating_add(ttl_ns)));
        }
    }

    pub fn name(&self, ip: &IpAddr, now_ns: i64) -> Option<&str> {
        self.names
            .get(ip)
            .filter(|(_, exp)| *exp > now_ns)
            .map(|(n, _)| n.as_str())
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use simple_dns::{CLASS, Name, Question, ResourceRecord, TYPE, rdata};

    pub fn answer_packet(name: &str, ip: std::net::Ipv4Addr, ttl: u32) -> Vec<u8> {
        let mut p = Packet::new_reply(0x1234);
        p.questions.push(Question::new(
            Name::new_unchecked(name),
            TYPE::A.into(),
            CLASS::IN.into(),
            false,
        ));
        p.answers.push(ResourceRecord::new(
            Name::new_unchecked(name),
            CLASS::IN,
            ttl,
            RData::A(rdata::A { address: ip.into() }),
        ));
        p.build_bytes_vec().unwrap()
    }

    #[test]
    fn parses_answer_and_caches_with_ttl() {
        let bytes = answer_packet("api.example.test", "10.1.2.3".parse().unwrap(), 120);
        let a = parse_answer(&bytes).unwrap();
        assert_eq!(a.name, "api.example.test");
        assert_eq!(a.addrs, vec!["10.1.2.3".parse::<IpAddr>().unwrap()]);
        let mut c = NameCache::new(10);
        c.insert(&a, 0);
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(c.name(&ip, 1), Some("api.example.test"));
        assert_eq!(c.name(&ip, 121_000_000_000), None);
        assert!(parse_answer(b"\x00\x01garbage").is_none());
        assert!(parse_answer(&[]).is_none());
    }
}
