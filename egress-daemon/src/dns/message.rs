//! DNS messages as the proxy needs them: the question of a query, the answers it writes
//! itself (REFUSED, NXDOMAIN, SERVFAIL, FORMERR), and the addresses of an upstream answer along
//! the CNAME chain that starts at the queried name.

use std::net::{IpAddr, Ipv6Addr};

use hickory_proto::{
    op::{Message, MessageType, OpCode, ResponseCode},
    rr::{Name, RData},
};

use crate::policy::domain::normalise;

/// The canary name: browsers that find it resolvable keep their own DNS over HTTPS off.
pub const CANARY: &str = "use-application-dns.net";
/// CNAME hops followed before the chain is cut (resolvers stop at about 8-16).
const MAX_CHAIN: usize = 16;

/// Why a datagram is not a query the proxy answers.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QueryError {
    #[error("not a DNS message")]
    Malformed,
    #[error("not a standard query with one question")]
    NotAQuery,
}

/// A parsed query: its id and its one question.
#[derive(Debug)]
pub struct Query {
    pub message: Message,
    /// The question's name, normalised (ASCII, lower case, no trailing dot); `""` for the root.
    pub name: String,
}

impl Query {
    pub fn parse(bytes: &[u8]) -> Result<Self, QueryError> {
        let message = Message::from_vec(bytes).map_err(|_| QueryError::Malformed)?;
        if message.metadata.message_type != MessageType::Query
            || message.metadata.op_code != OpCode::Query
            || message.queries.len() != 1
        {
            return Err(QueryError::NotAQuery);
        }
        let name = name_text(&message.queries[0].name);
        Ok(Self { message, name })
    }

    /// An answer with no records and `code`, echoing the question.
    pub fn answer_with(&self, code: ResponseCode) -> Vec<u8> {
        error_answer(&self.message, code)
    }
}

/// A FORMERR answer to a datagram that carried at least an id, or nothing.
pub fn format_error(bytes: &[u8]) -> Option<Vec<u8>> {
    let id = u16::from_be_bytes([*bytes.first()?, *bytes.get(1)?]);
    Message::error_msg(id, OpCode::Query, ResponseCode::FormErr).to_vec().ok()
}

fn error_answer(query: &Message, code: ResponseCode) -> Vec<u8> {
    let mut answer = Message::error_msg(query.metadata.id, query.metadata.op_code, code);
    answer.metadata.recursion_desired = query.metadata.recursion_desired;
    answer.metadata.recursion_available = true;
    answer.queries = query.queries.clone();
    // A message built from parsed parts always encodes; an empty answer is the fallback.
    answer.to_vec().unwrap_or_default()
}

/// A name as rules compare it; names that cannot be normalised keep their lower-case ASCII
/// form (no rule matches those).
pub fn name_text(name: &Name) -> String {
    let ascii = name.to_ascii();
    normalise(&ascii).unwrap_or_else(|_| ascii.trim_end_matches('.').to_ascii_lowercase())
}

/// What an upstream answer says about the queried name.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Learned {
    /// Every A and AAAA address along the CNAME chain starting at the queried name (IPv4 as
    /// v4-mapped), once each.
    pub addresses: Vec<Ipv6Addr>,
    /// The smallest TTL of the chain's records (seconds); 0 when there are no addresses.
    pub ttl: u32,
    /// The names of the chain after the queried one (CNAME targets).
    pub aliases: Vec<String>,
}

/// Parses an upstream answer to `query`; `None` when it is not one (wrong id or question).
pub fn read_answer(query: &Query, bytes: &[u8]) -> Option<(Message, Learned)> {
    let answer = Message::from_vec(bytes).ok()?;
    if answer.metadata.id != query.message.metadata.id
        || answer.metadata.message_type != MessageType::Response
        || answer.queries.len() != 1
        || name_text(&answer.queries[0].name) != query.name
    {
        return None;
    }
    let learned = chain_addresses(&query.name, &answer);
    Some((answer, learned))
}

/// `bytes` (an answer to `queried` that `learned` describes) without the A and AAAA records of
/// its chain whose addresses `learned` no longer holds (those beyond the per-answer cap): the
/// workload gets only addresses it can reach. `None` when it cannot be re-encoded.
pub fn keep_learned(bytes: &[u8], queried: &str, learned: &Learned) -> Option<Vec<u8>> {
    let mut answer = Message::from_vec(bytes).ok()?;
    let on_chain = |name: &Name| {
        let name = name_text(name);
        name == queried || learned.aliases.contains(&name)
    };
    answer.answers.retain(|record| {
        let address = match &record.data {
            RData::A(a) => a.0.to_ipv6_mapped(),
            RData::AAAA(aaaa) => aaaa.0,
            _ => return true,
        };
        !on_chain(&record.name) || learned.addresses.contains(&address)
    });
    answer.to_vec().ok()
}

/// The A/AAAA addresses along the CNAME chain from `name`, and the chain's smallest TTL.
fn chain_addresses(name: &str, answer: &Message) -> Learned {
    let mut chain = vec![name.to_string()];
    let mut ttl = u32::MAX;
    // Follow CNAMEs in whatever order the answer lists them.
    for _ in 0..MAX_CHAIN {
        let last = chain.last().cloned().unwrap_or_default();
        let next = answer.answers.iter().find_map(|record| match &record.data {
            RData::CNAME(target) if name_text(&record.name) == last => Some((name_text(&target.0), record.ttl)),
            _ => None,
        });
        match next {
            Some((target, record_ttl)) if !chain.contains(&target) => {
                ttl = ttl.min(record_ttl);
                chain.push(target);
            }
            _ => break,
        }
    }
    let mut learned = Learned::default();
    for record in &answer.answers {
        let address = match &record.data {
            RData::A(a) => IpAddr::V4(a.0),
            RData::AAAA(aaaa) => IpAddr::V6(aaaa.0),
            _ => continue,
        };
        if !chain.contains(&name_text(&record.name)) {
            continue;
        }
        let mapped = match address {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        if !learned.addresses.contains(&mapped) {
            learned.addresses.push(mapped);
        }
        ttl = ttl.min(record.ttl);
    }
    learned.ttl = if learned.addresses.is_empty() { 0 } else { ttl };
    learned.aliases = chain.into_iter().skip(1).collect();
    learned
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use hickory_proto::{
        op::Query as Question,
        rr::{
            rdata::{A, AAAA, CNAME},
            Record, RecordType,
        },
    };

    use super::*;

    fn query(name: &str) -> Query {
        let mut message = Message::query();
        message.add_query(Question::query(Name::from_ascii(name).unwrap(), RecordType::A));
        Query::parse(&message.to_vec().unwrap()).unwrap()
    }

    fn answer(query: &Query, records: Vec<Record>) -> Vec<u8> {
        let mut message = Message::response(query.message.metadata.id, OpCode::Query);
        message.queries = query.message.queries.clone();
        message.answers = records;
        message.to_vec().unwrap()
    }

    fn name(text: &str) -> Name {
        Name::from_ascii(text).unwrap()
    }

    #[test]
    fn question_names_are_normalised() {
        assert_eq!(query("API.Example.COM.").name, "api.example.com");
    }

    #[test]
    fn addresses_follow_the_cname_chain_from_the_queried_name_only() {
        let q = query("www.example.com.");
        let records = vec![
            Record::from_rdata(name("edge.cdn.net."), 30, RData::A(A(Ipv4Addr::new(10, 0, 0, 2)))),
            Record::from_rdata(name("www.example.com."), 300, RData::CNAME(CNAME(name("edge.cdn.net.")))),
            Record::from_rdata(name("edge.cdn.net."), 60, RData::AAAA(AAAA("2001:db8::2".parse().unwrap()))),
            Record::from_rdata(name("unrelated.org."), 1, RData::A(A(Ipv4Addr::new(10, 9, 9, 9)))),
        ];
        let (_, learned) = read_answer(&q, &answer(&q, records)).unwrap();
        assert_eq!(
            learned.addresses,
            vec![Ipv4Addr::new(10, 0, 0, 2).to_ipv6_mapped(), "2001:db8::2".parse::<Ipv6Addr>().unwrap()]
        );
        assert_eq!(learned.ttl, 30);
        assert_eq!(learned.aliases, vec!["edge.cdn.net".to_string()]);
    }

    #[test]
    fn addresses_beyond_the_cap_leave_the_answer_and_the_rest_stays() {
        let q = query("many.example.");
        let mut records: Vec<Record> = (1..=5u8)
            .map(|i| Record::from_rdata(name("many.example."), 60, RData::A(A(Ipv4Addr::new(10, 0, 0, i)))))
            .collect();
        records.push(Record::from_rdata(name("other.example."), 60, RData::A(A(Ipv4Addr::new(10, 9, 9, 9)))));
        let bytes = answer(&q, records);
        let (_, mut learned) = read_answer(&q, &bytes).unwrap();
        learned.addresses.truncate(2);
        let trimmed = keep_learned(&bytes, &q.name, &learned).unwrap();
        let (message, relearned) = read_answer(&q, &trimmed).unwrap();
        assert_eq!(relearned.addresses, learned.addresses);
        assert_eq!(message.answers.len(), 3, "two of the chain and the unrelated record");
        assert_eq!(message.metadata.id, q.message.metadata.id);
        assert_eq!(message.queries, q.message.queries);
    }

    #[test]
    fn a_cname_loop_ends() {
        let q = query("a.example.");
        let records = vec![
            Record::from_rdata(name("a.example."), 5, RData::CNAME(CNAME(name("b.example.")))),
            Record::from_rdata(name("b.example."), 5, RData::CNAME(CNAME(name("a.example.")))),
        ];
        let (_, learned) = read_answer(&q, &answer(&q, records)).unwrap();
        assert!(learned.addresses.is_empty());
    }

    #[test]
    fn an_answer_to_another_question_is_refused() {
        let q = query("a.example.");
        let other = query("b.example.");
        let mut bytes = answer(&other, vec![]);
        bytes[..2].copy_from_slice(&q.message.metadata.id.to_be_bytes());
        assert!(read_answer(&q, &bytes).is_none());
    }

    #[test]
    fn refusals_echo_the_question() {
        let q = query("x.example.");
        let bytes = q.answer_with(ResponseCode::Refused);
        let message = Message::from_vec(&bytes).unwrap();
        assert_eq!(message.metadata.response_code, ResponseCode::Refused);
        assert_eq!(message.queries, q.message.queries);
        assert_eq!(message.metadata.id, q.message.metadata.id);
    }
}
