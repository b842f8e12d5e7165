//! What an upstream answer must echo of the query it answers, beyond the kernel's check of its
//! source (the query's socket is connected to the resolver, from a random port): the query's
//! random id, and its question exactly, letter case included. The letters of the name sent
//! upstream get a random case ("0x20", draft-vixie-dnsext-dns0x20), which adds a bit of
//! guessing per letter to the id's 16; the workload's own spelling is put back in the answer.

/// DNS header length.
const HEADER: usize = 12;
/// Longest name on the wire (RFC 1035 3.1).
const MAX_NAME: usize = 255;

/// How an upstream answer failed to echo its query.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Mismatch {
    #[error("an answer too short to be one")]
    Short,
    #[error("an answer with another id")]
    Id,
    #[error("an answer to another question, or with the question's letters in another case")]
    Question,
}

/// Where the question of a one-question message ends (after its type and class); `None` when
/// it has not exactly one question or its name is compressed or malformed.
fn question_end(message: &[u8]) -> Option<usize> {
    if message.len() < HEADER || message[4..6] != [0, 1] {
        return None;
    }
    let mut at = HEADER;
    loop {
        let len = usize::from(*message.get(at)?);
        if len == 0 {
            break;
        }
        // 0xC0: a compression pointer, 0x40/0x80: reserved label types; none belongs in a query.
        if len > 63 {
            return None;
        }
        at += 1 + len;
        if at - HEADER >= MAX_NAME {
            return None;
        }
    }
    let end = at + 1 + 4;
    (end <= message.len()).then_some(end)
}

/// A copy of `query` whose question name has letters of random case; `None` when the query
/// has no plain question.
pub fn scramble(query: &[u8]) -> Option<Vec<u8>> {
    let end = question_end(query)?;
    let mut scrambled = query.to_vec();
    let mut coins = vec![0u8; end - HEADER];
    fill_random(&mut coins);
    let mut at = HEADER;
    while scrambled[at] != 0 {
        let len = usize::from(scrambled[at]);
        for i in at + 1..=at + len {
            if scrambled[i].is_ascii_alphabetic() {
                scrambled[i] = if coins[i - HEADER] & 1 == 0 {
                    scrambled[i].to_ascii_lowercase()
                } else {
                    scrambled[i].to_ascii_uppercase()
                };
            }
        }
        at += 1 + len;
    }
    Some(scrambled)
}

/// `Ok` when `answer` carries `sent`'s id and exactly its question (same bytes, same case).
pub fn check(sent: &[u8], answer: &[u8]) -> Result<(), Mismatch> {
    if answer.len() < HEADER || sent.len() < HEADER {
        return Err(Mismatch::Short);
    }
    if answer[..2] != sent[..2] {
        return Err(Mismatch::Id);
    }
    let end = question_end(sent).ok_or(Mismatch::Question)?;
    if answer.get(4..6) != Some(&[0, 1]) || answer.get(HEADER..end) != Some(&sent[HEADER..end]) {
        return Err(Mismatch::Question);
    }
    Ok(())
}

/// Puts the workload's question (`original`, the query before [`scramble`]) back into an
/// answer that passed [`check`]; names compressed to point at the question follow it.
pub fn restore(answer: &mut [u8], original: &[u8]) {
    let Some(end) = question_end(original) else { return };
    if let Some(question) = answer.get_mut(HEADER..end) {
        question.copy_from_slice(&original[HEADER..end]);
    }
}

/// Random bytes from the kernel; a short read leaves zeros (a weaker, still valid, choice).
pub fn fill_random(buffer: &mut [u8]) {
    // SAFETY: a buffer of the given length.
    unsafe { libc::getrandom(buffer.as_mut_ptr().cast(), buffer.len(), 0) };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A query for `name` (type A, class IN) with id 0x1234.
    fn query(name: &str) -> Vec<u8> {
        let mut bytes = vec![0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            bytes.push(u8::try_from(label.len()).unwrap());
            bytes.extend_from_slice(label.as_bytes());
        }
        bytes.extend_from_slice(&[0, 0, 1, 0, 1]);
        bytes
    }

    /// An answer echoing `question` with one A record whose owner points at the question.
    fn answer_to(question: &[u8]) -> Vec<u8> {
        let mut bytes = question.to_vec();
        bytes[2] = 0x81;
        bytes[3] = 0x80;
        bytes[7] = 1;
        bytes.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4, 10, 0, 0, 1]);
        bytes
    }

    #[test]
    fn scrambling_changes_only_the_case_of_letters() {
        let original = query("Api-1.Example.com");
        let long = query("abcdefghijklmnopqrstuvwxyz.abcdefghijklmnopqrstuvwxyz.test");
        let scrambled = scramble(&original).unwrap();
        assert_eq!(scrambled.len(), original.len());
        assert!(scrambled.eq_ignore_ascii_case(&original));
        assert_eq!(scrambled[..12], original[..12]);
        // 56 letters: all in one case by chance once in 2^55 runs.
        let mixed = scramble(&long).unwrap();
        assert!(mixed.iter().any(u8::is_ascii_uppercase) && mixed[13..].iter().any(u8::is_ascii_lowercase));
        assert_ne!(scramble(&long), scramble(&long), "a fresh draw every time");
    }

    #[test]
    fn only_an_exact_echo_passes_and_the_original_case_comes_back() {
        let original = query("Api.Example.com");
        let sent = scramble(&original).unwrap();
        let mut answer = answer_to(&sent);
        assert_eq!(check(&sent, &answer), Ok(()));
        restore(&mut answer, &original);
        assert_eq!(answer[12..original.len()], original[12..], "the workload's spelling");
        assert_eq!(answer[original.len()..], answer_to(&original)[original.len()..], "records untouched");

        let mut other_case = answer_to(&sent);
        let letter = other_case[13..].iter().position(u8::is_ascii_alphabetic).unwrap() + 13;
        other_case[letter] ^= 0x20;
        assert_eq!(check(&sent, &other_case), Err(Mismatch::Question));
        let mut other_id = answer_to(&sent);
        other_id[1] ^= 1;
        assert_eq!(check(&sent, &other_id), Err(Mismatch::Id));
        assert_eq!(check(&sent, &answer_to(&query("api.example.org"))[..]), Err(Mismatch::Question));
        assert_eq!(check(&sent, &sent[..8]), Err(Mismatch::Short));
    }

    #[test]
    fn compressed_or_malformed_questions_are_not_scrambled() {
        let mut compressed = query("a.test");
        compressed[12] = 0xC0;
        assert_eq!(scramble(&compressed), None);
        let truncated = query("a.test");
        assert_eq!(scramble(&truncated[..truncated.len() - 2]), None);
        let mut two_questions = query("a.test");
        two_questions[5] = 2;
        assert_eq!(scramble(&two_questions), None);
    }
}
