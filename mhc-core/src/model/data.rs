//! Byte-level training data: the embedded synthetic corpus, random training
//! windows and the train/validation split.
//!
//! Tokens are bytes (vocabulary 256), so no tokenizer exists anywhere: the
//! same bytes feed the CPU reference, the CUDA trainer and the browser.
//!
//! # The embedded corpus: why a toy language
//!
//! [`synthetic_corpus`] writes a small English-like language from a
//! probabilistic grammar: about 150 words, lowercase ASCII, one sentence a
//! line, every token followed by a space, every line ending in `.` and a
//! newline. It is the default data set because it needs no download, is the
//! same bytes on every platform for a given seed and, unlike random text or a
//! tiny real corpus, each of its line types calls on a different part of a
//! transformer, so that depth and the mixing of residual streams (what HC
//! and mHC change) show in the loss of a model small enough to train in
//! minutes:
//!
//! - **Long-range agreement needs attention across layers.** A verb agrees
//!   in number with its subject across nested relative clauses and
//!   prepositional phrases whose nouns carry the other number:
//!   `the dogs that the cat near the trees sees run .` Finding `dogs` past
//!   the attractors `cat` and `trees` takes attention composed over layers.
//! - **Brackets and quotes need a stack-like state.** `( )`, `[ ]` and
//!   `{ }` wrap clauses and nest; `"` wraps a reported sentence. The right
//!   closer depends on the innermost opener, several words back.
//! - **Facts need MLP memory.** Each of 30 invented people always lives in
//!   the same city, likes the same colour and keeps the same pet
//!   (`where does ana live ? in quito .`): no pattern, only lookup.
//! - **Addition and reversal need exact copying.** `37 + 45 = 82 .` and
//!   `reverse red oslo blue = blue oslo red .` call for induction-style
//!   copying and a carry.
//! - **Byte-level tokens are cheap.** The vocabulary is 256, the embedding
//!   tiny and there is no tokenizer; words are multi-byte spans the model
//!   must assemble, one more use of depth.
//!
//! The entropy is well below 8 bits a byte (spelling and grammar are highly
//! predictable: `bzip2 -9` stores 2 MiB of it at 0.9 bits a byte, `xz -9e`
//! at 1.2) but not trivial: word choice, nesting depth, numbers and the
//! reversed lists are random. The facts are a fixed table, the same for every seed, so the
//! training and validation parts of a corpus share one world.

use alloc::vec::Vec;

use crate::{MhcError, Result, Rng};

/// Grammatical number of a noun phrase; verbs agree with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Number {
    Singular,
    Plural,
}

impl Number {
    /// The form of a `(singular, plural)` pair for this number.
    fn form(self, pair: (&'static str, &'static str)) -> &'static str {
        match self {
            Self::Singular => pair.0,
            Self::Plural => pair.1,
        }
    }
}

/// Nouns that head noun phrases, as (singular, plural); three plurals are irregular.
const NOUNS: [(&str, &str); 16] = [
    ("dog", "dogs"),
    ("cat", "cats"),
    ("bird", "birds"),
    ("fox", "foxes"),
    ("horse", "horses"),
    ("farmer", "farmers"),
    ("king", "kings"),
    ("queen", "queens"),
    ("child", "children"),
    ("mouse", "mice"),
    ("wolf", "wolves"),
    ("teacher", "teachers"),
    ("robot", "robots"),
    ("sailor", "sailors"),
    ("baker", "bakers"),
    ("frog", "frogs"),
];

/// Intransitive verbs as (singular, plural) present-tense forms.
const INTRANSITIVE_VERBS: [(&str, &str); 8] = [
    ("runs", "run"),
    ("sleeps", "sleep"),
    ("sings", "sing"),
    ("laughs", "laugh"),
    ("waits", "wait"),
    ("swims", "swim"),
    ("falls", "fall"),
    ("dances", "dance"),
];

/// Transitive verbs as (singular, plural) present-tense forms.
const TRANSITIVE_VERBS: [(&str, &str); 8] = [
    ("sees", "see"),
    ("chases", "chase"),
    ("likes", "like"),
    ("helps", "help"),
    ("follows", "follow"),
    ("knows", "know"),
    ("finds", "find"),
    ("feeds", "feed"),
];

/// The copula, (singular, plural).
const COPULA: (&str, &str) = ("is", "are");

/// The verb that introduces a quoted sentence, (singular, plural).
const SAY: (&str, &str) = ("says", "say");

const ADJECTIVES: [&str; 8] = [
    "happy", "small", "old", "quick", "tired", "brave", "quiet", "loud",
];

/// Sentence-final adverbs.
const ADVERBS: [&str; 5] = ["far", "fast", "slowly", "again", "today"];

const PREPOSITIONS: [&str; 4] = ["near", "behind", "under", "beside"];

/// Objects of prepositions, (singular, plural): the attractors of agreement.
const PLACES: [(&str, &str); 6] = [
    ("tree", "trees"),
    ("river", "rivers"),
    ("house", "houses"),
    ("hill", "hills"),
    ("bridge", "bridges"),
    ("garden", "gardens"),
];

/// `the` is listed twice so that half the noun phrases carry number only on the noun.
const SINGULAR_DETERMINERS: [&str; 4] = ["the", "the", "a", "every"];
const PLURAL_DETERMINERS: [&str; 4] = ["the", "the", "some", "many"];

/// Bracket pairs that may wrap a modifier.
const BRACKETS: [(&str, &str); 3] = [("(", ")"), ("[", "]"), ("{", "}")];

const COLOURS: [&str; 8] = [
    "red", "blue", "green", "yellow", "white", "black", "orange", "purple",
];

const CITIES: [&str; 10] = [
    "oslo", "lima", "rome", "kyoto", "cairo", "quito", "dakar", "perth", "riga", "tunis",
];

/// One invented person and the facts that always hold for them.
#[derive(Clone, Copy, Debug)]
struct Person {
    name: &'static str,
    city: &'static str,
    colour: &'static str,
    pet: &'static str,
}

const fn person(
    name: &'static str,
    city: &'static str,
    colour: &'static str,
    pet: &'static str,
) -> Person {
    Person {
        name,
        city,
        colour,
        pet,
    }
}

/// The fixed world: the same for every seed (drawn once, offline, at random).
const PEOPLE: [Person; 30] = [
    person("ana", "quito", "green", "robot"),
    person("bo", "oslo", "blue", "fox"),
    person("cato", "quito", "red", "king"),
    person("dara", "oslo", "blue", "sailor"),
    person("eli", "dakar", "blue", "farmer"),
    person("fen", "lima", "orange", "cat"),
    person("gus", "tunis", "blue", "farmer"),
    person("hana", "tunis", "red", "robot"),
    person("ivo", "oslo", "yellow", "cat"),
    person("jun", "riga", "green", "mouse"),
    person("kai", "dakar", "green", "fox"),
    person("lio", "tunis", "white", "farmer"),
    person("mira", "lima", "yellow", "teacher"),
    person("nils", "lima", "blue", "cat"),
    person("oda", "tunis", "yellow", "frog"),
    person("pim", "riga", "orange", "wolf"),
    person("quin", "perth", "purple", "teacher"),
    person("rua", "cairo", "yellow", "farmer"),
    person("sol", "kyoto", "blue", "mouse"),
    person("tam", "riga", "purple", "wolf"),
    person("uma", "perth", "white", "bird"),
    person("vera", "lima", "orange", "farmer"),
    person("wim", "quito", "green", "frog"),
    person("xia", "dakar", "red", "bird"),
    person("yuri", "riga", "black", "wolf"),
    person("zed", "quito", "purple", "baker"),
    person("alba", "lima", "blue", "child"),
    person("brin", "perth", "blue", "cat"),
    person("cole", "cairo", "purple", "sailor"),
    person("dina", "dakar", "black", "dog"),
];

/// Nesting limit of noun-phrase modifiers, and the chance (percent) that a
/// noun phrase at each depth gets one: about one agreement or speech line
/// in seven holds two or more relative clauses.
const MODIFIER_PERCENT: [u64; 3] = [60, 40, 25];

/// Writes the language's lines into a byte buffer.
struct Generator {
    rng: Rng,
    out: Vec<u8>,
}

impl Generator {
    /// Appends one token and the space after it.
    fn word(&mut self, word: &str) {
        self.out.extend_from_slice(word.as_bytes());
        self.out.push(b' ');
    }

    /// Appends a decimal number as one token.
    fn number(&mut self, value: u64) {
        let mut digits = [0u8; 20];
        let mut len = 0;
        let mut rest = value;
        loop {
            digits[len] = b'0' + (rest % 10) as u8;
            len += 1;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        self.out.extend(digits[..len].iter().rev());
        self.out.push(b' ');
    }

    /// Ends the line.
    fn end_line(&mut self) {
        self.out.extend_from_slice(b".\n");
    }

    /// True with probability `percent`/100 (integer draws keep the stream platform-exact).
    fn chance(&mut self, percent: u64) -> bool {
        self.rng.below(100) < percent
    }

    /// A uniformly chosen element of a non-empty table.
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.rng.below(items.len() as u64) as usize]
    }

    fn number_of_noun(&mut self) -> Number {
        if self.chance(50) {
            Number::Singular
        } else {
            Number::Plural
        }
    }

    /// One line of a randomly chosen type.
    fn line(&mut self) {
        match self.rng.below(100) {
            0..45 => {
                self.clause(0);
                self.end_line();
            }
            45..55 => self.speech(),
            55..80 => self.fact(),
            80..90 => self.addition(),
            _ => self.reversal(),
        }
    }

    /// `NP VP [ADV]`, the verb agreeing with the subject; no full stop.
    fn clause(&mut self, depth: usize) {
        let subject = self.noun_phrase(depth);
        self.verb_phrase(subject, depth);
        if self.chance(20) {
            let adverb = self.pick(&ADVERBS);
            self.word(adverb);
        }
    }

    /// `NP say(s) " clause " .`
    fn speech(&mut self) {
        let speaker = self.noun_phrase(1);
        self.word(speaker.form(SAY));
        self.word("\"");
        self.clause(1);
        self.word("\"");
        self.end_line();
    }

    /// A name (optionally `from` its city), or `DET NOUN [MODIFIER]`; returns its number.
    fn noun_phrase(&mut self, depth: usize) -> Number {
        if self.chance(15) {
            let who = self.pick(&PEOPLE);
            self.word(who.name);
            if self.chance(30) {
                self.word("from");
                self.word(who.city);
            }
            return Number::Singular;
        }
        let number = self.number_of_noun();
        let determiner = match number {
            Number::Singular => self.pick(&SINGULAR_DETERMINERS),
            Number::Plural => self.pick(&PLURAL_DETERMINERS),
        };
        self.word(determiner);
        let noun = self.pick(&NOUNS);
        self.word(number.form(noun));
        if let Some(&percent) = MODIFIER_PERCENT.get(depth)
            && self.chance(percent)
        {
            self.modifier(number, depth + 1);
        }
        number
    }

    /// A relative clause (subject or object gap) or a prepositional phrase,
    /// a quarter of them in brackets.
    fn modifier(&mut self, head: Number, depth: usize) {
        let bracket = if self.chance(25) {
            Some(self.pick(&BRACKETS))
        } else {
            None
        };
        if let Some((open, _)) = bracket {
            self.word(open);
        }
        match self.rng.below(100) {
            // the dog that chases the cats ...
            0..40 => {
                self.word("that");
                self.verb_phrase(head, depth);
            }
            // the dogs that the cat sees ...
            40..75 => {
                self.word("that");
                let subject = self.noun_phrase(depth);
                let verb = self.pick(&TRANSITIVE_VERBS);
                self.word(subject.form(verb));
            }
            // the dog near the trees ...
            _ => {
                let preposition = self.pick(&PREPOSITIONS);
                self.word(preposition);
                self.word("the");
                let number = self.number_of_noun();
                let place = self.pick(&PLACES);
                self.word(number.form(place));
            }
        }
        if let Some((_, close)) = bracket {
            self.word(close);
        }
    }

    /// An intransitive verb, a transitive verb and its object, or `is/are ADJ`.
    fn verb_phrase(&mut self, subject: Number, depth: usize) {
        match self.rng.below(100) {
            0..40 => {
                let verb = self.pick(&INTRANSITIVE_VERBS);
                self.word(subject.form(verb));
            }
            40..80 => {
                let verb = self.pick(&TRANSITIVE_VERBS);
                self.word(subject.form(verb));
                self.noun_phrase(depth);
            }
            _ => {
                self.word(subject.form(COPULA));
                let adjective = self.pick(&ADJECTIVES);
                self.word(adjective);
            }
        }
    }

    /// One fact of the fixed world, stated or asked and answered.
    fn fact(&mut self) {
        let who = self.pick(&PEOPLE);
        match self.rng.below(5) {
            0 => {
                self.word(who.name);
                self.word("lives");
                self.word("in");
                self.word(who.city);
            }
            1 => {
                for word in ["where", "does", who.name, "live", "?", "in", who.city] {
                    self.word(word);
                }
            }
            2 => {
                for word in ["the", "colour", "of", who.name, "is", who.colour] {
                    self.word(word);
                }
            }
            3 => {
                for word in ["what", "is", "the", "colour", "of", who.name, "?"] {
                    self.word(word);
                }
                self.word(who.colour);
            }
            _ => {
                for word in ["the", "pet", "of", who.name, "is", "a", who.pet] {
                    self.word(word);
                }
            }
        }
        self.end_line();
    }

    /// `A + B = SUM .` with `A, B` in `0..100`.
    fn addition(&mut self) {
        let a = self.rng.below(100);
        let b = self.rng.below(100);
        self.number(a);
        self.word("+");
        self.number(b);
        self.word("=");
        self.number(a + b);
        self.end_line();
    }

    /// `reverse W1 … Wk = Wk … W1 .` with 2 to 5 colours and cities.
    fn reversal(&mut self) {
        let count = 2 + self.rng.below(4) as usize;
        let mut words = [""; 5];
        for slot in words.iter_mut().take(count) {
            let index = self.rng.below((COLOURS.len() + CITIES.len()) as u64) as usize;
            *slot = match COLOURS.get(index) {
                Some(colour) => colour,
                None => CITIES[index - COLOURS.len()],
            };
        }
        self.word("reverse");
        for word in &words[..count] {
            self.word(word);
        }
        self.word("=");
        for word in words[..count].iter().rev() {
            self.word(word);
        }
        self.end_line();
    }
}

/// The embedded default data set: `len` bytes of the toy language described
/// in the [module docs](self), the same bytes for a `seed` on every platform.
///
/// Lines are drawn independently until `len` bytes exist; the last line is
/// cut at `len`. Every byte is printable ASCII or `\n`. Generation is linear
/// in `len` (2 MiB take a few milliseconds in release builds).
pub fn synthetic_corpus(seed: u64, len: usize) -> Vec<u8> {
    // The longest line is a few hundred bytes; reserve once.
    let mut generator = Generator {
        rng: Rng::new(seed),
        out: Vec::with_capacity(len.saturating_add(1024)),
    };
    while generator.out.len() < len {
        generator.line();
    }
    generator.out.truncate(len);
    generator.out
}

/// Fills `out` with `batch` windows of `context + 1` consecutive bytes of
/// `data`, as token ids: window `b` is `out[b·(context+1) .. (b+1)·(context+1)]`,
/// its first `context` tokens the input and its last `context` the targets.
///
/// Each start is uniform in `0..=data.len() − context − 1`, drawn from `rng`.
///
/// # Errors
/// [`MhcError::EmptyBatch`] if `batch` or `context` is 0;
/// [`MhcError::ShapeMismatch`] if `data` is shorter than `context + 1` or
/// `out` does not hold `batch · (context + 1)` elements.
pub fn sample_batch(
    data: &[u8],
    batch: usize,
    context: usize,
    rng: &mut Rng,
    out: &mut [u32],
) -> Result<()> {
    if batch == 0 || context == 0 {
        return Err(MhcError::EmptyBatch);
    }
    let window = context.saturating_add(1);
    if data.len() < window {
        return Err(MhcError::ShapeMismatch {
            what: "data shorter than context + 1",
            expected: window,
            got: data.len(),
        });
    }
    let expected = batch.saturating_mul(window);
    if out.len() != expected {
        return Err(MhcError::ShapeMismatch {
            what: "the sampled batch (batch · (context + 1) token ids)",
            expected,
            got: out.len(),
        });
    }
    let starts = (data.len() - window + 1) as u64;
    for row in out.chunks_exact_mut(window) {
        let start = rng.below(starts) as usize;
        for (token, &byte) in row.iter_mut().zip(&data[start..start + window]) {
            *token = u32::from(byte);
        }
    }
    Ok(())
}

/// Splits `data` into `(train, validation)` at `floor(len · (1 − validation_fraction))`:
/// the last fraction is validation.
///
/// The fraction is clamped to `[0, 1]`; a non-finite one counts as 0 (all training).
pub fn split_train_validation(data: &[u8], validation_fraction: f64) -> (&[u8], &[u8]) {
    let fraction = if validation_fraction.is_finite() {
        validation_fraction.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let split = libm::floor(data.len() as f64 * (1.0 - fraction)) as usize;
    data.split_at(split.min(data.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::String;
    use std::vec;
    use std::{format, vec::Vec};

    /// A recursive-descent parser of the language that checks every
    /// agreement, bracket, fact, sum and reversal.
    struct Parser<'a> {
        tokens: Vec<&'a str>,
        at: usize,
    }

    type Check = core::result::Result<(), String>;

    fn form_number(pairs: &[(&str, &str)], word: &str) -> Option<Number> {
        pairs.iter().find_map(|&(singular, plural)| {
            if word == singular {
                Some(Number::Singular)
            } else if word == plural {
                Some(Number::Plural)
            } else {
                None
            }
        })
    }

    fn person_named(name: &str) -> Option<Person> {
        PEOPLE.iter().copied().find(|p| p.name == name)
    }

    impl<'a> Parser<'a> {
        fn new(line: &'a str) -> Self {
            Self {
                tokens: line.split(' ').collect(),
                at: 0,
            }
        }

        fn peek(&self) -> &'a str {
            self.tokens.get(self.at).copied().unwrap_or("")
        }

        fn next(&mut self) -> &'a str {
            let token = self.peek();
            self.at += 1;
            token
        }

        fn expect(&mut self, want: &str) -> Check {
            let got = self.next();
            if got == want {
                Ok(())
            } else {
                Err(format!("expected '{want}', got '{got}'"))
            }
        }

        fn agree(&self, what: &str, got: Option<Number>, want: Number) -> Check {
            if got == Some(want) {
                Ok(())
            } else {
                Err(format!(
                    "{what} '{}' disagrees with {want:?}",
                    self.tokens[self.at - 1]
                ))
            }
        }

        fn line(&mut self) -> Check {
            let first = self.peek();
            let second = self.tokens.get(1).copied().unwrap_or("");
            let is_fact = first == "where"
                || first == "what"
                || second == "lives"
                || (first == "the" && (second == "colour" || second == "pet"));
            if is_fact {
                self.fact_question_or_statement()
            } else if first == "reverse" {
                self.reversal()
            } else if first.bytes().all(|b| b.is_ascii_digit()) {
                self.addition()
            } else if self.tokens.contains(&"\"") {
                let speaker = self.noun_phrase()?;
                let verb = form_number(&[SAY], self.next());
                self.agree("say", verb, speaker)?;
                self.expect("\"")?;
                self.clause()?;
                self.expect("\"")?;
                self.expect(".")
            } else {
                self.clause()?;
                self.expect(".")
            }?;
            if self.at == self.tokens.len() {
                Ok(())
            } else {
                Err(format!("trailing tokens from {}", self.at))
            }
        }

        fn clause(&mut self) -> Check {
            let subject = self.noun_phrase()?;
            self.verb_phrase(subject)?;
            if ADVERBS.contains(&self.peek()) {
                self.next();
            }
            Ok(())
        }

        fn noun_phrase(&mut self) -> core::result::Result<Number, String> {
            let first = self.next();
            if let Some(who) = person_named(first) {
                if self.peek() == "from" {
                    self.next();
                    self.expect(who.city)?;
                }
                return Ok(Number::Singular);
            }
            let determiner = match first {
                "a" | "every" => Some(Number::Singular),
                "some" | "many" => Some(Number::Plural),
                "the" => None,
                _ => return Err(format!("'{first}' does not start a noun phrase")),
            };
            let number = form_number(&NOUNS, self.next()).ok_or("expected a noun")?;
            if let Some(determiner) = determiner {
                self.agree("noun", Some(number), determiner)?;
            }
            self.modifier(number)?;
            Ok(number)
        }

        fn modifier(&mut self, head: Number) -> Check {
            let close = BRACKETS
                .iter()
                .find(|(open, _)| *open == self.peek())
                .map(|&(_, close)| close);
            if close.is_some() {
                self.next();
            }
            if self.peek() == "that" {
                self.next();
                let after = self.peek();
                let is_verb = form_number(&INTRANSITIVE_VERBS, after).is_some()
                    || form_number(&TRANSITIVE_VERBS, after).is_some()
                    || form_number(&[COPULA], after).is_some();
                if is_verb {
                    self.verb_phrase(head)?;
                } else {
                    let subject = self.noun_phrase()?;
                    let verb = form_number(&TRANSITIVE_VERBS, self.next());
                    self.agree("relative-clause verb", verb, subject)?;
                }
            } else if PREPOSITIONS.contains(&self.peek()) {
                self.next();
                self.expect("the")?;
                form_number(&PLACES, self.next()).ok_or("expected a place")?;
            } else if close.is_some() {
                return Err(String::from("empty brackets"));
            }
            match close {
                Some(close) => self.expect(close),
                None => Ok(()),
            }
        }

        fn verb_phrase(&mut self, subject: Number) -> Check {
            let verb = self.next();
            if let Some(number) = form_number(&INTRANSITIVE_VERBS, verb) {
                self.agree("verb", Some(number), subject)
            } else if let Some(number) = form_number(&TRANSITIVE_VERBS, verb) {
                self.agree("verb", Some(number), subject)?;
                self.noun_phrase().map(|_| ())
            } else if let Some(number) = form_number(&[COPULA], verb) {
                self.agree("copula", Some(number), subject)?;
                if ADJECTIVES.contains(&self.next()) {
                    Ok(())
                } else {
                    Err(String::from("expected an adjective"))
                }
            } else {
                Err(format!("'{verb}' is not a verb"))
            }
        }

        fn fact_question_or_statement(&mut self) -> Check {
            let line = self.tokens.join(" ");
            let ok = PEOPLE.iter().any(|p| {
                let n = p.name;
                [
                    format!("{n} lives in {} .", p.city),
                    format!("where does {n} live ? in {} .", p.city),
                    format!("the colour of {n} is {} .", p.colour),
                    format!("what is the colour of {n} ? {} .", p.colour),
                    format!("the pet of {n} is a {} .", p.pet),
                ]
                .contains(&line)
            });
            self.at = self.tokens.len();
            if ok {
                Ok(())
            } else {
                Err(String::from("not a true fact"))
            }
        }

        fn addition(&mut self) -> Check {
            let a: u64 = self.next().parse().map_err(|_| "bad number")?;
            self.expect("+")?;
            let b: u64 = self.next().parse().map_err(|_| "bad number")?;
            self.expect("=")?;
            let sum: u64 = self.next().parse().map_err(|_| "bad number")?;
            if a >= 100 || b >= 100 || a + b != sum {
                return Err(format!("{a} + {b} = {sum} is wrong"));
            }
            self.expect(".")
        }

        fn reversal(&mut self) -> Check {
            self.expect("reverse")?;
            let mut words = Vec::new();
            while self.peek() != "=" && self.at < self.tokens.len() {
                let word = self.next();
                if !COLOURS.contains(&word) && !CITIES.contains(&word) {
                    return Err(format!("'{word}' is not a colour or city"));
                }
                words.push(word);
            }
            if !(2..=5).contains(&words.len()) {
                return Err(String::from("wrong list length"));
            }
            self.expect("=")?;
            for want in words.iter().rev() {
                self.expect(want)?;
            }
            self.expect(".")
        }
    }

    fn check_line(line: &str) -> Check {
        let body = line
            .strip_suffix(" .")
            .ok_or_else(|| String::from("line does not end in ' .'"))?;
        let mut parser = Parser::new(line);
        parser.line().map_err(|e| format!("{e} in '{body} .'"))
    }

    /// All complete lines (the last, cut one is dropped).
    fn complete_lines(corpus: &[u8]) -> Vec<&str> {
        let text = core::str::from_utf8(corpus).expect("ASCII");
        let mut lines: Vec<&str> = text.split('\n').collect();
        lines.pop();
        lines
    }

    #[test]
    fn deterministic_for_a_seed_and_different_across_seeds() {
        let a = synthetic_corpus(1234, 50_000);
        assert_eq!(a, synthetic_corpus(1234, 50_000));
        assert_eq!(a.len(), 50_000);
        assert_ne!(a, synthetic_corpus(1235, 50_000));
        // A shorter corpus is a prefix of a longer one for the same seed.
        assert_eq!(synthetic_corpus(1234, 1000)[..], a[..1000]);
        assert!(synthetic_corpus(7, 0).is_empty());
        // Pinned bytes: a change here changes every published curve.
        let start = core::str::from_utf8(&a[..120]).unwrap();
        assert_eq!(start, PINNED_START, "generator output changed");
    }

    const PINNED_START: &str = "the pet of mira is a teacher .\nthe baker dances .\npim from riga is brave .\nthe pet of ana is a robot .\nwhat is the colou";

    #[test]
    fn bytes_are_printable_ascii_or_newline() {
        let corpus = synthetic_corpus(3, 200_000);
        assert!(
            corpus
                .iter()
                .all(|&b| b == b'\n' || (b' '..=b'~').contains(&b))
        );
        assert!(corpus.contains(&b'\n'));
    }

    #[test]
    fn every_line_parses_agreement_brackets_facts_sums_reversals() {
        for seed in [0, 1, 1234] {
            let corpus = synthetic_corpus(seed, 300_000);
            let lines = complete_lines(&corpus);
            assert!(lines.len() > 3000);
            for line in &lines {
                if let Err(e) = check_line(line) {
                    panic!("seed {seed}: {e}");
                }
            }
        }
    }

    #[test]
    fn the_checker_rejects_wrong_lines() {
        assert!(check_line("the dogs that the cat sees run .").is_ok());
        for wrong in [
            "the dogs that the cat sees runs .",
            "the dogs that the cat see run .",
            "the dog that chase the cats runs .",
            "the dogs ( near the tree ] run .",
            "a dogs run .",
            "some dog runs .",
            "ana from oslo runs .",
            "ana lives in oslo .",
            "the pet of bo is a dog .",
            "37 + 45 = 83 .",
            "reverse red blue = red blue .",
            "the kings say \" the fox sleep \" .",
        ] {
            assert!(check_line(wrong).is_err(), "accepted '{wrong}'");
        }
    }

    #[test]
    fn brackets_and_quotes_balance_on_every_line() {
        let corpus = synthetic_corpus(11, 200_000);
        let (mut nested, mut bracketed) = (0, 0);
        for line in complete_lines(&corpus) {
            let mut stack = vec![];
            let mut deepest = 0;
            for token in line.split(' ') {
                match token {
                    "(" | "[" | "{" => stack.push(token),
                    ")" => assert_eq!(stack.pop(), Some("("), "{line}"),
                    "]" => assert_eq!(stack.pop(), Some("["), "{line}"),
                    "}" => assert_eq!(stack.pop(), Some("{"), "{line}"),
                    _ => {}
                }
                deepest = deepest.max(stack.len());
            }
            assert!(stack.is_empty(), "{line}");
            assert_eq!(line.matches('"').count() % 2, 0, "{line}");
            bracketed += usize::from(deepest >= 1);
            nested += usize::from(deepest >= 2);
        }
        assert!(bracketed > 500 && nested > 10, "{bracketed} {nested}");
    }

    #[test]
    fn every_line_type_and_nesting_appear() {
        let corpus = synthetic_corpus(5, 200_000);
        let lines = complete_lines(&corpus);
        let count = |f: &dyn Fn(&str) -> bool| lines.iter().filter(|l| f(l)).count();
        let total = lines.len();
        let fraction = |n: usize| n as f64 / total as f64;
        assert!(fraction(count(&|l| l.contains(" + "))) > 0.05);
        assert!(fraction(count(&|l| l.starts_with("reverse"))) > 0.05);
        assert!(fraction(count(&|l| l.contains('"'))) > 0.05);
        assert!(fraction(count(&|l| l.contains(" lives in ") || l.contains(" of "))) > 0.1);
        // Doubly nested relative clauses: long-range agreement.
        assert!(count(&|l| l.matches(" that ").count() >= 2) > 100);
    }

    #[test]
    fn sample_batch_windows_are_substrings() {
        let data = synthetic_corpus(9, 10_000);
        let (batch, context) = (8, 32);
        let mut out = vec![0u32; batch * (context + 1)];
        let mut rng = Rng::new(1);
        sample_batch(&data, batch, context, &mut rng, &mut out).unwrap();
        for row in out.chunks(context + 1) {
            let bytes: Vec<u8> = row.iter().map(|&t| u8::try_from(t).unwrap()).collect();
            assert!(data.windows(context + 1).any(|w| w == bytes));
        }
        // The extreme starts are reachable: data of exactly context + 1 bytes.
        let tiny = b"abcd";
        let mut out = vec![0u32; 2 * 4];
        sample_batch(tiny, 2, 3, &mut rng, &mut out).unwrap();
        assert_eq!(out, [97, 98, 99, 100, 97, 98, 99, 100]);
        // Both ends of a two-start range are drawn.
        let mut seen = [false; 2];
        let mut out = vec![0u32; 3];
        for _ in 0..100 {
            sample_batch(b"xyzw", 1, 2, &mut rng, &mut out).unwrap();
            seen[(out[0] - u32::from(b'x')) as usize] = true;
        }
        assert_eq!(seen, [true, true]);
    }

    #[test]
    fn sample_batch_errors() {
        let mut rng = Rng::new(0);
        let data = [0u8; 10];
        let mut out = vec![0u32; 8];
        assert_eq!(
            sample_batch(&data, 0, 3, &mut rng, &mut out),
            Err(MhcError::EmptyBatch)
        );
        assert_eq!(
            sample_batch(&data, 2, 0, &mut rng, &mut out),
            Err(MhcError::EmptyBatch)
        );
        assert_eq!(
            sample_batch(&data[..3], 2, 3, &mut rng, &mut out),
            Err(MhcError::ShapeMismatch {
                what: "data shorter than context + 1",
                expected: 4,
                got: 3
            })
        );
        assert!(matches!(
            sample_batch(&data, 3, 3, &mut rng, &mut out),
            Err(MhcError::ShapeMismatch {
                expected: 12,
                got: 8,
                ..
            })
        ));
        assert!(sample_batch(&data, 2, usize::MAX, &mut rng, &mut out).is_err());
        assert!(sample_batch(&data, usize::MAX, 3, &mut rng, &mut out).is_err());
    }

    #[test]
    fn split_keeps_the_last_fraction_for_validation() {
        let data: Vec<u8> = (0..100).collect();
        let (train, validation) = split_train_validation(&data, 0.1);
        assert_eq!((train.len(), validation.len()), (90, 10));
        assert_eq!(validation[0], 90);
        let (train, validation) = split_train_validation(&data[..7], 0.25);
        assert_eq!((train.len(), validation.len()), (5, 2));
        assert_eq!(split_train_validation(&data, 0.0).1.len(), 0);
        assert_eq!(split_train_validation(&data, 1.0).0.len(), 0);
        assert_eq!(split_train_validation(&data, -3.0).1.len(), 0);
        assert_eq!(split_train_validation(&data, 7.0).0.len(), 0);
        assert_eq!(split_train_validation(&data, f64::NAN).1.len(), 0);
        assert_eq!(split_train_validation(&[], 0.5), (&[][..], &[][..]));
    }
}
