//! Field kinds: what sort of personal datum a value is, how it is put into
//! canonical form before it is fingerprinted, and how it is masked for roles
//! that may only see part of it.
//!
//! Every value that enters the vault is tagged with a [`FieldKind`]. The kind
//! decides three things:
//!
//! * **Normalisation** ([`FieldKind::normalise`]). Two spellings of the same
//!   datum ("138 1234 5678" and "+86 138-1234-5678", or NFC and NFD "Zoë")
//!   must fingerprint identically, so the vault only ever stores, hashes and
//!   compares the normalised form. Normalisation also rejects input that is
//!   empty, oversized, malformed for its kind, or carries control and invisible
//!   formatting characters (which could make two values look alike on screen,
//!   or reorder text through bidi controls, while fingerprinting differently).
//! * **Masking** ([`FieldKind::mask`]). Roles without full reveal rights see a
//!   display form that follows common Chinese e-commerce practice
//!   ("138****5678", "张*明", "浙江省杭州市西湖区****") and also works for
//!   Latin-script data.
//! * **Stable identifiers**. [`FieldKind::code`] is stored in the database,
//!   bound into the AEAD associated data and equal to the protobuf enum number;
//!   [`FieldKind::token_prefix`] starts every token. Neither may ever change.
//!
//! Errors ([`InvalidValue`]) are shown to API callers, so their text never
//! contains any part of the value: only lengths, the code point of a forbidden
//! invisible character, and fixed reason strings.

use std::fmt;
use std::str::FromStr;

use unicode_normalization::UnicodeNormalization;
use zeroize::Zeroizing;

/// Largest value accepted, in bytes of UTF-8 (before normalisation).
pub const MAX_VALUE_BYTES: usize = 4096;

/// What sort of personal datum a value is.
///
/// The numeric [`code`](FieldKind::code) and the
/// [`token prefix`](FieldKind::token_prefix) are part of the stored format and
/// the wire protocol; new kinds get new numbers, old ones are never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FieldKind {
    /// A person's name, in any script ("张小明", "José Núñez").
    Name,
    /// A telephone number, normalised to E.164 form ("+8613812345678").
    Phone,
    /// A postal or delivery address.
    Address,
    /// An identity document number (resident ID card, passport number).
    IdNumber,
    /// An e-mail address.
    Email,
    /// A merchant's order number.
    OrderNumber,
    /// Free-text order details (items, notes); may span several lines.
    OrderDetails,
    /// A merchant's customer identifier.
    CustomerId,
}

impl FieldKind {
    /// Every kind, in order of [`code`](FieldKind::code).
    pub const ALL: [FieldKind; 8] = [
        FieldKind::Name,
        FieldKind::Phone,
        FieldKind::Address,
        FieldKind::IdNumber,
        FieldKind::Email,
        FieldKind::OrderNumber,
        FieldKind::OrderDetails,
        FieldKind::CustomerId,
    ];

    /// The kind's name as used in configuration, logs and the API
    /// (`"name"`, `"phone"`, `"id_number"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            FieldKind::Name => "name",
            FieldKind::Phone => "phone",
            FieldKind::Address => "address",
            FieldKind::IdNumber => "id_number",
            FieldKind::Email => "email",
            FieldKind::OrderNumber => "order_number",
            FieldKind::OrderDetails => "order_details",
            FieldKind::CustomerId => "customer_id",
        }
    }

    /// The kind's stable number.
    ///
    /// It is stored in the database, bound into the AEAD associated data and
    /// equal to the protobuf enum number, so it must never change.
    pub fn code(self) -> u8 {
        match self {
            FieldKind::Name => 1,
            FieldKind::Phone => 2,
            FieldKind::Address => 3,
            FieldKind::IdNumber => 4,
            FieldKind::Email => 5,
            FieldKind::OrderNumber => 6,
            FieldKind::OrderDetails => 7,
            FieldKind::CustomerId => 8,
        }
    }

    /// The kind with this stable number, or `None` for a number no kind has
    /// (including 0, the protobuf "unspecified" value).
    pub fn from_code(code: u8) -> Option<FieldKind> {
        FieldKind::ALL.into_iter().find(|kind| kind.code() == code)
    }

    /// The two-letter prefix that starts every token of this kind.
    pub fn token_prefix(self) -> &'static str {
        match self {
            FieldKind::Name => "nm",
            FieldKind::Phone => "ph",
            FieldKind::Address => "ad",
            FieldKind::IdNumber => "id",
            FieldKind::Email => "em",
            FieldKind::OrderNumber => "on",
            FieldKind::OrderDetails => "od",
            FieldKind::CustomerId => "cu",
        }
    }

    /// The kind whose tokens start with exactly this prefix, or `None`.
    pub fn from_token_prefix(prefix: &str) -> Option<FieldKind> {
        FieldKind::ALL
            .into_iter()
            .find(|kind| kind.token_prefix() == prefix)
    }

    /// Puts a raw value into the canonical form that is fingerprinted and
    /// stored, or says why it cannot be accepted.
    ///
    /// For every kind: input over [`MAX_VALUE_BYTES`] is rejected before any
    /// other work; the text is put into Unicode NFC and trimmed; empty text is
    /// rejected; control and invisible formatting characters are rejected
    /// (tab and newline are allowed in order details, where CRLF becomes LF).
    /// Then, per kind:
    ///
    /// * name, address: runs of whitespace become one space; a name needs at
    ///   least one letter.
    /// * phone: `+<digits>` (E.164, 8 to 15 digits). A leading `+` or `00`
    ///   marks an international number; otherwise it is Chinese domestic, its
    ///   trunk `0` dropped and `+86` put in front.
    /// * id_number: whitespace removed, ASCII uppercased, 5 to 20 ASCII
    ///   letters and digits; an 18-character Chinese resident ID must have the
    ///   right ISO 7064 MOD 11-2 check character.
    /// * email: one `@`, a non-empty local part, a dotted domain without empty
    ///   labels, no whitespace; ASCII lowercased.
    /// * order_number: 1 to 64 of ASCII letters, digits, `-`, `_`, `/`, `.`.
    /// * order_details: free text.
    /// * customer_id: 1 to 128 characters, no whitespace.
    ///
    /// Full-width digits and letters (as Chinese input methods type them) are
    /// read as ASCII in phone and ID numbers. Normalising an already
    /// normalised value returns it unchanged.
    ///
    /// Whitespace at either end (including tab and newline) is trimmed before
    /// the check for forbidden characters: it is dropped, not stored, so a
    /// pasted trailing newline is harmless.
    pub fn normalise(self, raw: &str) -> Result<Zeroizing<String>, InvalidValue> {
        if raw.len() > MAX_VALUE_BYTES {
            return Err(InvalidValue::TooLong {
                len: raw.len(),
                max: MAX_VALUE_BYTES,
            });
        }
        let is_free_text = self == FieldKind::OrderDetails;
        let composed = compose(raw, is_free_text);
        let text = composed.trim();
        if text.is_empty() {
            return Err(InvalidValue::Empty);
        }
        if let Some(c) = text.chars().find(|&c| is_forbidden(c, is_free_text)) {
            return Err(InvalidValue::ForbiddenChar {
                codepoint: u32::from(c),
            });
        }
        let normalised = match self {
            FieldKind::Name => normalise_name(text)?,
            FieldKind::Phone => normalise_phone(text)?,
            FieldKind::Address => collapse_whitespace(text),
            FieldKind::IdNumber => normalise_id_number(text)?,
            FieldKind::Email => normalise_email(text)?,
            FieldKind::OrderNumber => normalise_order_number(text)?,
            FieldKind::OrderDetails => copy(text),
            FieldKind::CustomerId => normalise_customer_id(text)?,
        };
        // NFC can lengthen text (some characters decompose and never
        // recompose). Holding the limit on the output too keeps normalise
        // idempotent and lets storage rely on the bound.
        if normalised.len() > MAX_VALUE_BYTES {
            return Err(InvalidValue::TooLong {
                len: normalised.len(),
                max: MAX_VALUE_BYTES,
            });
        }
        Ok(normalised)
    }

    /// The display form of a normalised value for roles that may only see a
    /// masked value.
    ///
    /// `normalised` is expected to be the output of
    /// [`normalise`](FieldKind::normalise); any other text still gets a mask
    /// (never a panic), just a less tailored one. Masks work on `char`s, so no
    /// UTF-8 sequence is ever split.
    pub fn mask(self, normalised: &str) -> String {
        match self {
            FieldKind::Name => mask_name(normalised),
            FieldKind::Phone => mask_phone(normalised),
            FieldKind::Address => mask_address(normalised),
            FieldKind::IdNumber => mask_id_number(normalised),
            FieldKind::Email => mask_email(normalised),
            FieldKind::OrderNumber => mask_order_number(normalised),
            FieldKind::OrderDetails => mask_order_details(normalised),
            FieldKind::CustomerId => mask_customer_id(normalised),
        }
    }
}

impl fmt::Display for FieldKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FieldKind {
    type Err = UnknownKind;

    /// Accepts exactly the names [`FieldKind::as_str`] returns; no case
    /// folding or trimming, so config typos are reported rather than guessed.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        FieldKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == s)
            .ok_or(UnknownKind)
    }
}

/// A field kind name that is not one of the known kinds.
///
/// The caller should use one of the names listed in the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown field kind; known kinds are name, phone, address, id_number, email, order_number, order_details, customer_id"
)]
pub struct UnknownKind;

/// Why a value was refused by [`FieldKind::normalise`].
///
/// These are caller mistakes: the request should be corrected and resent.
/// The message is shown to API callers, so it never contains any part of the
/// value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidValue {
    /// The value is empty or only whitespace. Send the datum itself, or leave
    /// the field out.
    #[error("is empty")]
    Empty,
    /// The value is larger than the vault accepts. Shorten it; large free
    /// text belongs in the merchant's own systems.
    #[error("is {len} bytes, over the limit of {max} bytes")]
    TooLong {
        /// Size of the value in bytes of UTF-8.
        len: usize,
        /// The limit, [`MAX_VALUE_BYTES`].
        max: usize,
    },
    /// The value contains a control character or an invisible formatting
    /// character (bidi control, zero-width character, soft hyphen). Strip it
    /// at the source; such characters make different values look identical.
    #[error("contains a control or invisible formatting character (U+{codepoint:04X})")]
    ForbiddenChar {
        /// The first offending code point.
        codepoint: u32,
    },
    /// The value is not well formed for its kind (a phone number with
    /// letters, an ID number whose check character is wrong, ...). Fix the
    /// value or send it as a different kind.
    #[error("is not a valid {kind}: {reason}")]
    Malformed {
        /// The kind the value was submitted as.
        kind: FieldKind,
        /// A fixed description of the rule that was broken.
        reason: &'static str,
    },
}

// ---------------------------------------------------------------------------
// Normalisation helpers
// ---------------------------------------------------------------------------

fn malformed(kind: FieldKind, reason: &'static str) -> InvalidValue {
    InvalidValue::Malformed { kind, reason }
}

/// Copies `text` into a fresh buffer that is wiped on drop.
fn copy(text: &str) -> Zeroizing<String> {
    let mut out = Zeroizing::new(String::with_capacity(text.len()));
    out.push_str(text);
    out
}

/// NFC of `raw` in a buffer that is wiped on drop; with `crlf_to_lf`, CRLF
/// line ends become LF.
///
/// The buffer is reserved at three times the input up front because NFC never
/// expands UTF-8 text by more than that (UAX #15 gives 3× as NFC's maximum
/// expansion factor): pushing then never reallocates, and so never leaves an
/// unwiped copy of the value in freed memory. The normaliser's own small
/// internal buffers, and the caller's `raw`, are out of our reach.
///
/// CRLF folding exists because HTML form submission turns every textarea
/// newline into CRLF; without it, most multi-line order details from web shops
/// would be refused for their U+000D.
fn compose(raw: &str, crlf_to_lf: bool) -> Zeroizing<String> {
    let mut out = Zeroizing::new(String::with_capacity(raw.len().saturating_mul(3)));
    let mut chars = raw.nfc().peekable();
    while let Some(c) = chars.next() {
        if crlf_to_lf && c == '\r' && chars.peek() == Some(&'\n') {
            continue;
        }
        out.push(c);
    }
    out
}

/// Whether `c` may never appear in a value: C0/C1 controls (tab and newline
/// excepted in free text), bidi controls, and zero-width or otherwise
/// invisible formatting characters.
///
/// Bidi controls can make a stored value render in a different order than it
/// is stored ("Trojan Source", CVE-2021-42574); invisible characters make two
/// values that look the same fingerprint differently. The middle dots U+00B7
/// and U+30FB, used between parts of transliterated names, are ordinary
/// punctuation and allowed.
fn is_forbidden(c: char, allow_tab_newline: bool) -> bool {
    match c {
        '\n' | '\t' => !allow_tab_newline,
        // C0 and C1 control characters, DEL included.
        '\u{0}'..='\u{1F}' | '\u{7F}'..='\u{9F}' => true,
        // Bidi controls: Arabic letter mark, LRM/RLM, embeddings and
        // overrides, isolates.
        '\u{061C}'
        | '\u{200E}'
        | '\u{200F}'
        | '\u{202A}'..='\u{202E}'
        | '\u{2066}'..='\u{2069}' => true,
        // Zero-width space/non-joiner/joiner, word joiner and invisible
        // operators, byte order mark, soft hyphen.
        '\u{200B}'..='\u{200D}' | '\u{2060}'..='\u{2064}' | '\u{FEFF}' | '\u{00AD}' => true,
        _ => false,
    }
}

/// Replaces every run of whitespace with one ASCII space. `text` is already
/// trimmed, so no space lands at either end.
fn collapse_whitespace(text: &str) -> Zeroizing<String> {
    let mut out = Zeroizing::new(String::with_capacity(text.len()));
    let mut in_space = false;
    for c in text.chars() {
        if c.is_whitespace() {
            if !in_space {
                out.push(' ');
            }
            in_space = true;
        } else {
            out.push(c);
            in_space = false;
        }
    }
    out
}

/// Maps full-width ASCII forms (U+FF01–U+FF5E) to ASCII.
///
/// Chinese input methods commonly produce full-width digits and letters
/// ("１３８"), which NFC leaves alone; for phone and ID numbers they are the
/// same datum and must fingerprint the same.
fn fold_full_width(c: char) -> char {
    if ('\u{FF01}'..='\u{FF5E}').contains(&c) {
        char::from_u32(u32::from(c) - 0xFEE0).unwrap_or(c)
    } else {
        c
    }
}

fn normalise_name(text: &str) -> Result<Zeroizing<String>, InvalidValue> {
    let collapsed = collapse_whitespace(text);
    if !collapsed.chars().any(char::is_alphabetic) {
        return Err(malformed(
            FieldKind::Name,
            "must contain at least one letter",
        ));
    }
    Ok(collapsed)
}

/// Country code assumed for numbers written without one: the vault serves
/// Chinese merchants first.
const DEFAULT_COUNTRY_CODE: &str = "86";

/// E.164 allows at most 15 digits; 8 is the shortest that real numbers with
/// their country code reach, and anything shorter is a typo or a short code.
const PHONE_DIGITS: std::ops::RangeInclusive<usize> = 8..=15;

/// Phone numbers become `+<country code><national number>` (E.164 without
/// separators). A leading `+` or `00` marks an international number whose
/// digits are taken as given; anything else is a Chinese domestic number
/// whose trunk `0` is dropped before `+86` is put in front.
fn normalise_phone(text: &str) -> Result<Zeroizing<String>, InvalidValue> {
    const BAD_CHAR: &str =
        "may contain only digits, spaces, '-', '.', '(', ')' and a leading '+' or '00'";
    let mut digits = Zeroizing::new(String::with_capacity(text.len()));
    let mut plus = false;
    for c in text.chars().map(fold_full_width) {
        match c {
            '0'..='9' => digits.push(c),
            // The '+' must come before any digit; "(+86)" is a common way to
            // write it.
            '+' if !plus && digits.is_empty() => plus = true,
            '-' | '.' | '(' | ')' => {}
            c if c.is_whitespace() => {}
            _ => return Err(malformed(FieldKind::Phone, BAD_CHAR)),
        }
    }
    let international = if plus {
        Some(digits.as_str())
    } else {
        digits.strip_prefix("00")
    };
    let mut out = Zeroizing::new(String::with_capacity(digits.len() + 3));
    out.push('+');
    match international {
        Some(number) => {
            // E.164 country codes never start with 0; "+0..." or "000..." is
            // a typo, and accepting it would give one number two spellings.
            if number.starts_with('0') {
                return Err(malformed(
                    FieldKind::Phone,
                    "country code cannot start with 0",
                ));
            }
            out.push_str(number);
        }
        None => {
            out.push_str(DEFAULT_COUNTRY_CODE);
            out.push_str(digits.strip_prefix('0').unwrap_or(&digits));
        }
    }
    if !PHONE_DIGITS.contains(&(out.len() - 1)) {
        return Err(malformed(
            FieldKind::Phone,
            "must have 8 to 15 digits including the country code",
        ));
    }
    Ok(out)
}

/// Weights of the ISO 7064 MOD 11-2 check of the 18-character Chinese
/// resident identity number (GB 11643-1999).
const RESIDENT_ID_WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
/// Check characters, indexed by the weighted sum modulo 11 (GB 11643-1999).
const RESIDENT_ID_CHECK: &[u8; 11] = b"10X98765432";

fn normalise_id_number(text: &str) -> Result<Zeroizing<String>, InvalidValue> {
    let mut out = Zeroizing::new(String::with_capacity(text.len()));
    for c in text.chars().map(fold_full_width) {
        if c.is_whitespace() {
            continue;
        }
        if !c.is_ascii_alphanumeric() {
            return Err(malformed(
                FieldKind::IdNumber,
                "may contain only ASCII letters and digits",
            ));
        }
        out.push(c.to_ascii_uppercase());
    }
    if !(5..=20).contains(&out.len()) {
        return Err(malformed(FieldKind::IdNumber, "must be 5 to 20 characters"));
    }
    if let Some(expected) = resident_id_check_char(out.as_bytes())
        && out.as_bytes().last() != Some(&expected)
    {
        return Err(malformed(
            FieldKind::IdNumber,
            "check character does not match",
        ));
    }
    Ok(out)
}

/// The check character a Chinese resident identity number must end with, if
/// `id` has that shape (17 digits, then a digit or `X`); `None` for any other
/// document number, which carries no check we know.
fn resident_id_check_char(id: &[u8]) -> Option<u8> {
    let (body, last) = match id {
        [body @ .., last] if body.len() == 17 => (body, *last),
        _ => return None,
    };
    if !body.iter().all(u8::is_ascii_digit) || !(last.is_ascii_digit() || last == b'X') {
        return None;
    }
    let sum: u32 = body
        .iter()
        .zip(RESIDENT_ID_WEIGHTS)
        .map(|(digit, weight)| u32::from(digit - b'0') * weight)
        .sum();
    // sum % 11 is below 11, the length of the table.
    RESIDENT_ID_CHECK.get((sum % 11) as usize).copied()
}

fn normalise_email(text: &str) -> Result<Zeroizing<String>, InvalidValue> {
    let bad = |reason| Err(malformed(FieldKind::Email, reason));
    if text.chars().any(char::is_whitespace) {
        return bad("must not contain whitespace");
    }
    let Some((local, domain)) = text.split_once('@') else {
        return bad("must contain exactly one '@'");
    };
    if domain.contains('@') {
        return bad("must contain exactly one '@'");
    }
    if local.is_empty() {
        return bad("has nothing before the '@'");
    }
    if !domain.contains('.') {
        return bad("domain must contain a '.'");
    }
    if domain.split('.').any(str::is_empty) {
        return bad("domain has an empty label");
    }
    // Only ASCII is lowercased: that is what every mail system treats as
    // case-insensitive; non-ASCII local parts are left as the owner wrote
    // them (already in NFC).
    let mut out = copy(text);
    out.make_ascii_lowercase();
    Ok(out)
}

fn normalise_order_number(text: &str) -> Result<Zeroizing<String>, InvalidValue> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '/' | '.');
    if !text.chars().all(allowed) {
        return Err(malformed(
            FieldKind::OrderNumber,
            "may contain only ASCII letters, digits, '-', '_', '/' and '.'",
        ));
    }
    // All characters are ASCII here, so bytes count characters.
    if text.len() > 64 {
        return Err(malformed(
            FieldKind::OrderNumber,
            "must be at most 64 characters",
        ));
    }
    Ok(copy(text))
}

fn normalise_customer_id(text: &str) -> Result<Zeroizing<String>, InvalidValue> {
    if text.chars().any(char::is_whitespace) {
        return Err(malformed(
            FieldKind::CustomerId,
            "must not contain whitespace",
        ));
    }
    if text.chars().count() > 128 {
        return Err(malformed(
            FieldKind::CustomerId,
            "must be at most 128 characters",
        ));
    }
    Ok(copy(text))
}

// ---------------------------------------------------------------------------
// Masks
// ---------------------------------------------------------------------------

fn stars(n: usize) -> String {
    "*".repeat(n)
}

/// First char, one star per hidden char, last char. One char becomes "*",
/// two chars keep the first ("张三" → "张*").
fn mask_middle(value: &str) -> String {
    let n = value.chars().count();
    let mut chars = value.chars();
    match (chars.next(), chars.next_back()) {
        (Some(first), Some(last)) if n >= 3 => {
            let mut out = String::with_capacity(value.len());
            out.push(first);
            out.push_str(&stars(n - 2));
            out.push(last);
            out
        }
        (Some(first), Some(_)) => {
            let mut out = String::from(first);
            out.push('*');
            out
        }
        _ => stars(n),
    }
}

/// Separators between the parts of a name; the first char after each stays
/// visible in Latin-script names ("Jean-Luc" → "J***-L**").
fn is_name_separator(c: char) -> bool {
    c.is_whitespace() || matches!(c, '-' | '\u{00B7}' | '\u{30FB}')
}

/// Names in Latin script keep the initial of each word ("John Smith" →
/// "J*** S****"); names without ASCII letters (Chinese, and transliterations
/// joined with a middle dot) keep only the first and last char ("张小明" →
/// "张*明"), as Chinese shops display them.
fn mask_name(value: &str) -> String {
    if value.chars().any(|c| c.is_ascii_alphabetic()) {
        let mut out = String::with_capacity(value.len());
        let mut word_start = true;
        for c in value.chars() {
            if is_name_separator(c) {
                out.push(c);
                word_start = true;
            } else if word_start {
                out.push(c);
                word_start = false;
            } else {
                out.push('*');
            }
        }
        // A name made only of initials ("A B C") would come out unchanged;
        // fall back to the first-and-last rule so something is hidden.
        if out != value {
            return out;
        }
    }
    mask_middle(value)
}

/// Chinese mobile numbers show as "138****5678" (the national number, first
/// three and last four digits). Other numbers keep `+`, the first three and
/// the last four digits, with one star per hidden digit. Numbers too short to
/// keep seven digits keep only the last two.
fn mask_phone(value: &str) -> String {
    let Some(digits) = value.strip_prefix('+') else {
        return stars(value.chars().count());
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return stars(value.chars().count());
    }
    // Every byte is an ASCII digit from here on, so byte slicing is safe.
    // No other country code starts with 86 (ITU-T E.164 assignments), so the
    // prefix alone identifies Chinese numbers.
    let (plus, number) = match digits.strip_prefix(DEFAULT_COUNTRY_CODE) {
        Some(national) => ("", national),
        None => ("+", digits),
    };
    let n = number.len();
    let mut out = String::with_capacity(value.len());
    out.push_str(plus);
    // At least one digit must be hidden, so keeping seven needs eight.
    if n >= 8 {
        out.push_str(&number[..3]);
        out.push_str(&stars(n - 7));
        out.push_str(&number[n - 4..]);
    } else {
        let keep = n.saturating_sub(1).min(2);
        out.push_str(&stars(n - keep));
        out.push_str(&number[n - keep..]);
    }
    out
}

fn mask_id_number(value: &str) -> String {
    if value.chars().count() <= 2 {
        // Keeping the first and last char of one or two would show it all.
        return stars(value.chars().count());
    }
    mask_middle(value)
}

/// CJK unified ideographs (basic block, extension A, compatibility block,
/// extensions B and later): an address with any of these is treated as
/// Chinese.
fn is_cjk_ideograph(c: char) -> bool {
    matches!(
        c,
        '\u{3400}'..='\u{4DBF}'
            | '\u{4E00}'..='\u{9FFF}'
            | '\u{F900}'..='\u{FAFF}'
            | '\u{20000}'..='\u{3134F}'
    )
}

fn mask_address(value: &str) -> String {
    if value.chars().any(is_cjk_ideograph) {
        mask_chinese_address(value)
    } else {
        mask_latin_address(value)
    }
}

/// Chinese addresses keep the administrative region (province, city,
/// district, county, town) and hide the street and house number:
/// "浙江省杭州市西湖区文三路123号" → "浙江省杭州市西湖区****".
///
/// The region ends at the last administrative suffix before the first
/// street-level marker or digit. Words that end in 区 or 市 but name a place
/// inside a district (小区 "residential compound", 社区, 园区, 校区, 景区, 厂区,
/// 超市 "supermarket") are not suffixes: keeping them would show the compound.
/// When unsure the mask hides more, never less.
fn mask_chinese_address(value: &str) -> String {
    const MASK: &str = "****";
    let mut keep_end = None;
    let mut prev = None;
    for (i, c) in value.char_indices() {
        if c.is_numeric() || matches!(c, '路' | '街' | '道' | '巷' | '弄' | '号' | '村' | '里')
        {
            break;
        }
        let is_suffix = match c {
            '区' => !matches!(prev, Some('小' | '社' | '园' | '校' | '景' | '厂')),
            '市' => prev != Some('超'),
            '省' | '县' | '旗' | '盟' | '州' | '镇' | '乡' => true,
            _ => false,
        };
        if is_suffix {
            keep_end = Some(i + c.len_utf8());
        }
        prev = Some(c);
    }
    match keep_end.and_then(|end| value.get(..end)) {
        Some(region) => {
            let mut out = String::with_capacity(region.len() + MASK.len());
            out.push_str(region);
            out.push_str(MASK);
            out
        }
        None => MASK.to_owned(),
    }
}

/// Latin-script addresses keep their last two comma-separated components
/// (town and postcode, country) and hide the rest:
/// "221B Baker Street, London NW1 6XE, UK" → "****, London NW1 6XE, UK".
/// With a single comma only the last component is kept, so the first (the
/// street) is always hidden; with none, everything is.
fn mask_latin_address(value: &str) -> String {
    let commas = value.matches(',').count();
    let keep = commas.min(2);
    if keep == 0 {
        return "****".to_owned();
    }
    match value.rmatch_indices(',').nth(keep - 1) {
        Some((at, _)) => {
            let mut out = String::from("****");
            out.push_str(&value[at..]);
            out
        }
        None => "****".to_owned(),
    }
}

fn mask_email(value: &str) -> String {
    match value.split_once('@') {
        Some((local, domain)) => {
            let mut out = String::with_capacity(domain.len() + 8);
            out.extend(local.chars().next());
            out.push_str("***@");
            out.push_str(domain);
            out
        }
        None => "****".to_owned(),
    }
}

fn mask_order_number(value: &str) -> String {
    let n = value.chars().count();
    if n <= 4 {
        return stars(n);
    }
    // The fourth char from the end exists because n > 4.
    let tail = value
        .char_indices()
        .rev()
        .nth(3)
        .map_or("", |(at, _)| &value[at..]);
    let mut out = stars(n - 4);
    out.push_str(tail);
    out
}

fn mask_order_details(value: &str) -> String {
    let mut out = String::with_capacity(8);
    out.extend(value.chars().next());
    out.push_str("***");
    out
}

fn mask_customer_id(value: &str) -> String {
    if value.chars().count() < 4 {
        return "****".to_owned();
    }
    let mut out: String = value.chars().take(2).collect();
    out.push_str("****");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ok(kind: FieldKind, raw: &str) -> String {
        match kind.normalise(raw) {
            Ok(v) => v.as_str().to_owned(),
            Err(e) => panic!("{kind} {raw:?} rejected: {e}"),
        }
    }

    fn bad(kind: FieldKind, reason: &'static str) -> InvalidValue {
        InvalidValue::Malformed { kind, reason }
    }

    fn forbidden(c: char) -> InvalidValue {
        InvalidValue::ForbiddenChar {
            codepoint: u32::from(c),
        }
    }

    fn check_table(kind: FieldKind, accepted: &[(&str, &str)], rejected: &[(&str, InvalidValue)]) {
        for (raw, expected) in accepted {
            assert_eq!(ok(kind, raw), *expected, "{kind} {raw:?}");
        }
        for (raw, expected) in rejected {
            assert_eq!(
                kind.normalise(raw).as_deref().map(String::as_str),
                Err(expected),
                "{kind} {raw:?}"
            );
        }
    }

    /// Rejections every kind shares.
    #[test]
    fn all_kinds_reject_empty_invisible_and_control_characters() {
        let cases = [
            ("", InvalidValue::Empty),
            ("   ", InvalidValue::Empty),
            ("\u{3000}\t\n", InvalidValue::Empty),
            ("ab\u{0}cd", forbidden('\u{0}')),
            ("ab\u{1B}cd", forbidden('\u{1B}')),
            ("ab\u{7F}cd", forbidden('\u{7F}')),
            ("ab\u{85}cd", forbidden('\u{85}')),
            ("ab\u{9F}cd", forbidden('\u{9F}')),
            ("ab\rcd", forbidden('\r')),
            ("ab\u{202E}cd", forbidden('\u{202E}')),
            ("ab\u{2066}cd", forbidden('\u{2066}')),
            ("ab\u{061C}cd", forbidden('\u{061C}')),
            ("ab\u{200E}cd", forbidden('\u{200E}')),
            ("ab\u{200B}cd", forbidden('\u{200B}')),
            ("ab\u{200D}cd", forbidden('\u{200D}')),
            ("ab\u{2060}cd", forbidden('\u{2060}')),
            ("ab\u{FEFF}cd", forbidden('\u{FEFF}')),
            ("ab\u{AD}cd", forbidden('\u{AD}')),
            // The first offending code point is reported.
            ("a\u{200B}b\u{0}c", forbidden('\u{200B}')),
        ];
        for kind in FieldKind::ALL {
            for (raw, expected) in &cases {
                assert_eq!(
                    kind.normalise(raw).err().as_ref(),
                    Some(expected),
                    "{kind} {raw:?}"
                );
            }
        }
    }

    #[test]
    fn tab_and_newline_are_forbidden_except_in_order_details() {
        for kind in FieldKind::ALL {
            for c in ['\t', '\n'] {
                let raw = format!("ab{c}cd");
                let got = kind.normalise(&raw).err();
                if kind == FieldKind::OrderDetails {
                    assert_eq!(got, None, "{kind} {raw:?}");
                } else {
                    assert_eq!(got, Some(forbidden(c)), "{kind} {raw:?}");
                }
            }
        }
    }

    #[test]
    fn too_long_is_checked_on_raw_bytes_first() {
        let max = MAX_VALUE_BYTES;
        for kind in FieldKind::ALL {
            assert_eq!(
                kind.normalise(&"a".repeat(4097)).err(),
                Some(InvalidValue::TooLong { len: 4097, max }),
                "{kind}"
            );
            // Checked before anything else: even forbidden characters.
            assert_eq!(
                kind.normalise(&"\u{0}".repeat(5000)).err(),
                Some(InvalidValue::TooLong { len: 5000, max }),
                "{kind}"
            );
            // Bytes, not chars: 1366 × 3 bytes.
            assert_eq!(
                kind.normalise(&"张".repeat(1366)).err(),
                Some(InvalidValue::TooLong { len: 4098, max }),
                "{kind}"
            );
        }
        assert_eq!(ok(FieldKind::Name, &"a".repeat(4096)).len(), 4096);
        assert_eq!(ok(FieldKind::OrderDetails, &"a".repeat(4096)).len(), 4096);
    }

    #[test]
    fn too_long_after_nfc_expansion() {
        // U+0958 has a composition exclusion: NFC turns its 3 bytes into 6.
        let raw = "\u{0958}".repeat(1000);
        assert_eq!(raw.len(), 3000);
        assert_eq!(
            FieldKind::OrderDetails.normalise(&raw).err(),
            Some(InvalidValue::TooLong {
                len: 6000,
                max: MAX_VALUE_BYTES
            })
        );
    }

    #[test]
    fn name_normalisation() {
        check_table(
            FieldKind::Name,
            &[
                ("张三", "张三"),
                ("  John   Smith  ", "John Smith"),
                ("张\u{3000}三", "张 三"),
                ("Jean-Luc\u{A0}Picard", "Jean-Luc Picard"),
                ("阿卜杜拉·买买提", "阿卜杜拉·买买提"),
                ("山田・太郎", "山田・太郎"),
                ("José Núñez\n", "José Núñez"),
                ("O'Brien", "O'Brien"),
            ],
            &[
                (
                    "12345",
                    bad(FieldKind::Name, "must contain at least one letter"),
                ),
                (
                    "- · -",
                    bad(FieldKind::Name, "must contain at least one letter"),
                ),
                ("张\t三", forbidden('\t')),
                ("Zo\u{200D}ë", forbidden('\u{200D}')),
            ],
        );
    }

    #[test]
    fn nfc_and_nfd_spellings_normalise_identically() {
        for (nfc, nfd) in [
            ("José Núñez", "Jose\u{301} Nu\u{301}n\u{303}ez"),
            ("Zoë", "Zoe\u{308}"),
            ("Ångström", "A\u{30A}ngstro\u{308}m"),
        ] {
            assert_ne!(nfc, nfd);
            for kind in [
                FieldKind::Name,
                FieldKind::Address,
                FieldKind::OrderDetails,
                FieldKind::CustomerId,
            ] {
                let raw_nfd = nfd.replace(' ', "_");
                let raw_nfc = nfc.replace(' ', "_");
                assert_eq!(ok(kind, &raw_nfd), ok(kind, &raw_nfc), "{kind}");
                assert_eq!(ok(kind, &raw_nfd), raw_nfc, "{kind}");
            }
            assert_eq!(ok(FieldKind::Name, nfd), nfc);
        }
        assert_eq!(
            ok(FieldKind::Email, "Zoe\u{308}@Example.com"),
            "zoë@example.com"
        );
    }

    #[test]
    fn phone_normalisation() {
        let cn = "+8613812345678";
        let malformed_char = bad(
            FieldKind::Phone,
            "may contain only digits, spaces, '-', '.', '(', ')' and a leading '+' or '00'",
        );
        let digit_count = bad(
            FieldKind::Phone,
            "must have 8 to 15 digits including the country code",
        );
        let zero_cc = bad(FieldKind::Phone, "country code cannot start with 0");
        check_table(
            FieldKind::Phone,
            &[
                ("13812345678", cn),
                ("138 1234 5678", cn),
                ("+86 138-1234-5678", cn),
                ("0086 13812345678", cn),
                ("+8613812345678", cn),
                ("(+86) 138.1234.5678", cn),
                ("\u{FF0B}８６ １３８１２３４５６７８", cn),
                ("010-1234-5678", "+861012345678"),
                ("(0571) 8888 8888", "+8657188888888"),
                ("+44 20 7946 0958", "+442079460958"),
                ("0044 20 7946 0958", "+442079460958"),
                ("+1 (415) 555-0100", "+14155550100"),
                ("+123456789012345", "+123456789012345"),
                ("+12345678", "+12345678"),
            ],
            &[
                ("138-1234-5678 ext 9", malformed_char.clone()),
                ("138/1234/5678", malformed_char.clone()),
                ("138+12345678", malformed_char.clone()),
                ("++8613812345678", malformed_char.clone()),
                ("１３８一二三四", malformed_char),
                ("+", digit_count.clone()),
                ("--", digit_count.clone()),
                ("12345", digit_count.clone()),
                ("+1234567", digit_count.clone()),
                ("+1234567890123456", digit_count.clone()),
                ("0086 12345678901234", digit_count.clone()),
                ("+0123456789", zero_cc.clone()),
                ("000123456789", zero_cc),
            ],
        );
    }

    #[test]
    fn address_normalisation() {
        check_table(
            FieldKind::Address,
            &[
                (
                    "  浙江省杭州市西湖区\u{3000}\u{3000}文三路123号 ",
                    "浙江省杭州市西湖区 文三路123号",
                ),
                (
                    "221B  Baker Street,\u{A0}London NW1 6XE,\u{2028}UK",
                    "221B Baker Street, London NW1 6XE, UK",
                ),
            ],
            &[("文三路\n123号", forbidden('\n'))],
        );
    }

    #[test]
    fn id_number_normalisation() {
        let chars = bad(
            FieldKind::IdNumber,
            "may contain only ASCII letters and digits",
        );
        let length = bad(FieldKind::IdNumber, "must be 5 to 20 characters");
        let check = bad(FieldKind::IdNumber, "check character does not match");
        check_table(
            FieldKind::IdNumber,
            &[
                ("11010519491231002X", "11010519491231002X"),
                ("110105 19491231 002x", "11010519491231002X"),
                ("１１０１０５１９４９１２３１００２ｘ", "11010519491231002X"),
                ("440524188001010014", "440524188001010014"),
                // The old 15-digit card has no check character.
                ("110105491231002", "110105491231002"),
                ("e1234 5678", "E12345678"),
                ("12345", "12345"),
                ("ABCDEFGHIJ0123456789", "ABCDEFGHIJ0123456789"),
            ],
            &[
                ("110105194912310021", check.clone()),
                ("110105194912310020", check.clone()),
                ("440524188001010015", check),
                ("1234", length.clone()),
                ("ABCDEFGHIJ01234567890", length),
                ("AB-12345", chars.clone()),
                ("证件12345", chars),
            ],
        );
    }

    #[test]
    fn resident_id_check_matches_gb_11643() {
        assert_eq!(resident_id_check_char(b"11010519491231002X"), Some(b'X'));
        assert_eq!(resident_id_check_char(b"440524188001010014"), Some(b'4'));
        assert_eq!(resident_id_check_char(b"110105491231002"), None);
        assert_eq!(resident_id_check_char(b"11010519491231002Z"), None);
        assert_eq!(resident_id_check_char(b"A1010519491231002X"), None);
    }

    #[test]
    fn email_normalisation() {
        let one_at = bad(FieldKind::Email, "must contain exactly one '@'");
        let dot = bad(FieldKind::Email, "domain must contain a '.'");
        let label = bad(FieldKind::Email, "domain has an empty label");
        check_table(
            FieldKind::Email,
            &[
                (" John.Smith@Example.COM ", "john.smith@example.com"),
                (
                    "zhang.san+shop@mail.example.cn",
                    "zhang.san+shop@mail.example.cn",
                ),
                ("ÉMILE@example.fr", "Émile@example.fr"),
            ],
            &[
                (
                    "john smith@example.com",
                    bad(FieldKind::Email, "must not contain whitespace"),
                ),
                ("johnexample.com", one_at.clone()),
                ("john@doe@example.com", one_at),
                (
                    "@example.com",
                    bad(FieldKind::Email, "has nothing before the '@'"),
                ),
                ("john@localhost", dot),
                ("john@example..com", label.clone()),
                ("john@.example.com", label.clone()),
                ("john@example.com.", label),
            ],
        );
    }

    #[test]
    fn order_number_normalisation() {
        let chars = bad(
            FieldKind::OrderNumber,
            "may contain only ASCII letters, digits, '-', '_', '/' and '.'",
        );
        let long = "A".repeat(64);
        check_table(
            FieldKind::OrderNumber,
            &[
                ("SO-2026/11_22.001", "SO-2026/11_22.001"),
                (" SO20261122001 ", "SO20261122001"),
                ("so20261122001", "so20261122001"),
                (long.as_str(), long.as_str()),
            ],
            &[
                ("SO 2026", chars.clone()),
                ("订单123", chars.clone()),
                ("SO#1", chars),
                (
                    "A".repeat(65).as_str(),
                    bad(FieldKind::OrderNumber, "must be at most 64 characters"),
                ),
            ],
        );
    }

    #[test]
    fn order_details_normalisation() {
        check_table(
            FieldKind::OrderDetails,
            &[
                (
                    "Blue mug ×2\r\nGift wrap:\tyes",
                    "Blue mug ×2\nGift wrap:\tyes",
                ),
                ("\n  蓝色杯子  两个 \n", "蓝色杯子  两个"),
                ("line one\n\nline three", "line one\n\nline three"),
            ],
            &[
                ("a\rb", forbidden('\r')),
                ("a\u{7}b", forbidden('\u{7}')),
                ("note \u{202E}txt.exe", forbidden('\u{202E}')),
            ],
        );
    }

    #[test]
    fn customer_id_normalisation() {
        let long = "c".repeat(128);
        check_table(
            FieldKind::CustomerId,
            &[
                ("cust_0001", "cust_0001"),
                (" 用户-42 ", "用户-42"),
                (long.as_str(), long.as_str()),
            ],
            &[
                (
                    "cust 0001",
                    bad(FieldKind::CustomerId, "must not contain whitespace"),
                ),
                (
                    "c".repeat(129).as_str(),
                    bad(FieldKind::CustomerId, "must be at most 128 characters"),
                ),
            ],
        );
    }

    #[test]
    fn mask_examples() {
        let cases: &[(FieldKind, &str, &str)] = &[
            (FieldKind::Phone, "+8613812345678", "138****5678"),
            (FieldKind::Phone, "+442079460958", "+442*****0958"),
            (FieldKind::Phone, "+44123457890", "+441****7890"),
            (FieldKind::Phone, "+861234567", "*****67"),
            (FieldKind::Phone, "+12", "+*2"),
            (FieldKind::Phone, "+861012345678", "101***5678"),
            (FieldKind::Phone, "+8612345", "***45"),
            (FieldKind::Phone, "+123456", "+****56"),
            (FieldKind::Name, "张三", "张*"),
            (FieldKind::Name, "张小明", "张*明"),
            (FieldKind::Name, "欧阳小明", "欧**明"),
            (FieldKind::Name, "张", "*"),
            (FieldKind::Name, "阿卜杜拉·买买提", "阿******提"),
            (FieldKind::Name, "John Smith", "J*** S****"),
            (FieldKind::Name, "Jean-Luc Picard", "J***-L** P*****"),
            (FieldKind::Name, "José Núñez", "J*** N****"),
            (FieldKind::Name, "A B C", "A***C"),
            (
                FieldKind::IdNumber,
                "11010519491231002X",
                "1****************X",
            ),
            (FieldKind::IdNumber, "E12345678", "E*******8"),
            (
                FieldKind::Address,
                "浙江省杭州市西湖区文三路123号",
                "浙江省杭州市西湖区****",
            ),
            (
                FieldKind::Address,
                "新疆维吾尔自治区乌鲁木齐市天山区解放北路1号",
                "新疆维吾尔自治区乌鲁木齐市天山区****",
            ),
            (
                FieldKind::Address,
                "内蒙古自治区呼和浩特市新城区",
                "内蒙古自治区呼和浩特市新城区****",
            ),
            (
                FieldKind::Address,
                "上海市浦东新区世纪大道100号",
                "上海市浦东新区****",
            ),
            (
                FieldKind::Address,
                "浙江省杭州市西湖区翠苑小区5幢",
                "浙江省杭州市西湖区****",
            ),
            (
                FieldKind::Address,
                "北京市朝阳区建国路88号SOHO现代城",
                "北京市朝阳区****",
            ),
            (FieldKind::Address, "文三路123号", "****"),
            (
                FieldKind::Address,
                "221B Baker Street, London NW1 6XE, UK",
                "****, London NW1 6XE, UK",
            ),
            (
                FieldKind::Address,
                "Flat 2, 221B Baker Street, London NW1 6XE, UK",
                "****, London NW1 6XE, UK",
            ),
            (
                FieldKind::Address,
                "1 Main St, Springfield",
                "****, Springfield",
            ),
            (FieldKind::Address, "221B Baker Street London", "****"),
            (
                FieldKind::Email,
                "john.smith@example.com",
                "j***@example.com",
            ),
            (FieldKind::Email, "张三@例子.中国", "张***@例子.中国"),
            (FieldKind::OrderNumber, "SO20261122001", "*********2001"),
            (FieldKind::OrderNumber, "A1234", "*1234"),
            (FieldKind::OrderNumber, "1234", "****"),
            (FieldKind::OrderNumber, "12", "**"),
            (FieldKind::OrderDetails, "Blue mug ×2\nGift wrap", "B***"),
            (FieldKind::OrderDetails, "蓝色杯子", "蓝***"),
            (FieldKind::CustomerId, "cust_0001", "cu****"),
            (FieldKind::CustomerId, "用户42", "用户****"),
            (FieldKind::CustomerId, "abc", "****"),
        ];
        for (kind, value, expected) in cases {
            assert_eq!(kind.mask(value), *expected, "{kind} {value:?}");
        }
    }

    #[test]
    fn masks_of_normalised_examples() {
        let phone = ok(FieldKind::Phone, "138 1234 5678");
        assert_eq!(FieldKind::Phone.mask(&phone), "138****5678");
        let id = ok(FieldKind::IdNumber, "110105 19491231 002x");
        assert_eq!(FieldKind::IdNumber.mask(&id), "1****************X");
    }

    #[test]
    fn invalid_value_display_never_contains_the_value() {
        let secret = "Zhang San 13812345678";
        let cases: Vec<(FieldKind, String, &str)> = vec![
            (FieldKind::Name, "\u{3000} \t".to_owned(), "is empty"),
            (
                FieldKind::Name,
                secret.repeat(200),
                "is 4200 bytes, over the limit of 4096 bytes",
            ),
            (
                FieldKind::Address,
                format!("{secret}\u{202E}"),
                "contains a control or invisible formatting character (U+202E)",
            ),
            (
                FieldKind::Address,
                format!("{secret}\u{0}"),
                "contains a control or invisible formatting character (U+0000)",
            ),
            (
                FieldKind::Phone,
                secret.to_owned(),
                "is not a valid phone: may contain only digits, spaces, '-', '.', '(', ')' and a leading '+' or '00'",
            ),
            (
                FieldKind::IdNumber,
                "110105194912310021".to_owned(),
                "is not a valid id_number: check character does not match",
            ),
            (
                FieldKind::Email,
                "zhang.san@mailcn".to_owned(),
                "is not a valid email: domain must contain a '.'",
            ),
            (
                FieldKind::OrderNumber,
                "订单SO20261122001".to_owned(),
                "is not a valid order_number: may contain only ASCII letters, digits, '-', '_', '/' and '.'",
            ),
            (
                FieldKind::CustomerId,
                secret.to_owned(),
                "is not a valid customer_id: must not contain whitespace",
            ),
        ];
        for (kind, raw, expected) in cases {
            let Err(err) = kind.normalise(&raw) else {
                panic!("{kind} {raw:?} accepted");
            };
            let shown = err.to_string();
            assert_eq!(shown, expected);
            let trimmed = raw.trim();
            assert!(trimmed.is_empty() || !shown.contains(trimmed), "{shown}");
            for part in [
                "Zhang",
                "1381234",
                "110105",
                "zhang.san",
                "mailcn",
                "SO2026",
                "订单",
            ] {
                assert!(!shown.contains(part), "{shown} contains {part}");
            }
        }
    }

    #[test]
    fn kind_identifiers_round_trip() {
        let names = [
            "name",
            "phone",
            "address",
            "id_number",
            "email",
            "order_number",
            "order_details",
            "customer_id",
        ];
        let prefixes = ["nm", "ph", "ad", "id", "em", "on", "od", "cu"];
        for (i, kind) in FieldKind::ALL.into_iter().enumerate() {
            assert_eq!(kind.as_str(), names[i]);
            assert_eq!(kind.to_string(), names[i]);
            assert_eq!(names[i].parse::<FieldKind>(), Ok(kind));
            assert_eq!(usize::from(kind.code()), i + 1);
            assert_eq!(FieldKind::from_code(kind.code()), Some(kind));
            assert_eq!(kind.token_prefix(), prefixes[i]);
            assert_eq!(
                FieldKind::from_token_prefix(kind.token_prefix()),
                Some(kind)
            );
        }
        assert_eq!(FieldKind::from_code(0), None);
        assert_eq!(FieldKind::from_code(9), None);
        assert_eq!(FieldKind::from_code(255), None);
        assert_eq!(FieldKind::from_token_prefix(""), None);
        assert_eq!(FieldKind::from_token_prefix("NM"), None);
        assert_eq!(FieldKind::from_token_prefix("nm_"), None);
        for unknown in [
            "",
            "Name",
            "PHONE",
            " name",
            "name ",
            "idnumber",
            "id-number",
        ] {
            assert_eq!(
                unknown.parse::<FieldKind>(),
                Err(UnknownKind),
                "{unknown:?}"
            );
        }
        assert_eq!(
            UnknownKind.to_string(),
            "unknown field kind; known kinds are name, phone, address, id_number, email, order_number, order_details, customer_id"
        );
    }

    #[test]
    fn all_is_sorted_by_code_and_prefixes_are_distinct() {
        let mut sorted = FieldKind::ALL;
        sorted.sort_by_key(|kind| kind.code());
        assert_eq!(sorted, FieldKind::ALL);
        for a in FieldKind::ALL {
            for b in FieldKind::ALL {
                if a != b {
                    assert_ne!(a.token_prefix(), b.token_prefix());
                    assert_ne!(a.code(), b.code());
                }
            }
        }
    }

    /// Characters that exercise the normalisers: combining marks, several
    /// kinds of whitespace, CJK, separators, full-width forms and a few
    /// forbidden characters.
    fn tricky_text() -> impl Strategy<Value = String> {
        let alphabet = vec![
            'a', 'Z', 'e', 'o', '0', '1', '8', '6', '9', 'X', 'x', ' ', ' ', '\u{3000}', '\u{A0}',
            '\t', '\n', '\r', '\u{301}', '\u{308}', '\u{303}', 'é', 'ö', '张', '三', '区', '市',
            '路', '号', '·', '・', '-', '.', '_', '/', '(', ')', '+', '@', ',', '１', '＋',
            '\u{0}', '\u{202E}', '\u{200B}', '\u{FEFF}', '\u{0958}', 'Å', '\u{30A}',
        ];
        prop::collection::vec(prop::sample::select(alphabet), 0..40)
            .prop_map(|chars| chars.into_iter().collect())
    }

    /// Strings shaped like each kind, so the accepting paths get exercised
    /// and not only the rejections.
    fn shaped(kind: FieldKind) -> BoxedStrategy<String> {
        match kind {
            FieldKind::Phone => "(\\+|00|０)?[0-9０-９ ()\\-.]{4,22}".boxed(),
            FieldKind::IdNumber => "[0-9A-Za-zＸ ]{3,24}".boxed(),
            FieldKind::Email => {
                " ?[A-Za-z0-9._+É-]{1,10}@[A-Za-z0-9-]{1,8}(\\.[A-Za-z]{1,5}){1,2} ?".boxed()
            }
            FieldKind::OrderNumber => " ?[A-Za-z0-9_/.-]{1,70} ?".boxed(),
            FieldKind::CustomerId => "[A-Za-z0-9_张-]{1,20}".boxed(),
            FieldKind::Name | FieldKind::Address | FieldKind::OrderDetails => tricky_text().boxed(),
        }
    }

    fn any_kind() -> impl Strategy<Value = FieldKind> {
        prop::sample::select(FieldKind::ALL.to_vec())
    }

    fn kind_and_value() -> impl Strategy<Value = (FieldKind, String)> {
        any_kind().prop_flat_map(|kind| {
            prop_oneof![shaped(kind), tricky_text(), any::<String>()]
                .prop_map(move |value| (kind, value))
        })
    }

    proptest! {
        #[test]
        fn normalise_is_idempotent((kind, raw) in kind_and_value()) {
            if let Ok(once) = kind.normalise(&raw) {
                let twice = kind.normalise(&once);
                prop_assert_eq!(twice.as_deref(), Ok(&*once));
            }
        }

        #[test]
        fn mask_never_panics_on_any_text(kind in any_kind(), text in any::<String>()) {
            let _ = kind.mask(&text);
        }

        #[test]
        fn mask_hides_something_of_normalised_values((kind, raw) in kind_and_value()) {
            if let Ok(value) = kind.normalise(&raw) {
                // A value that already has stars where the mask puts them
                // would come out unchanged; that says nothing about the mask.
                if !value.contains('*') {
                    let masked = kind.mask(&value);
                    prop_assert!(masked.contains('*'), "{} {:?}", kind, masked);
                    if value.chars().count() >= 4 {
                        prop_assert_ne!(masked, value.as_str());
                    }
                }
            }
        }

        #[test]
        fn error_text_never_contains_the_value((kind, raw) in kind_and_value()) {
            if let Err(err) = kind.normalise(&raw) {
                let shown = err.to_string();
                // Every message is built from ASCII-only fixed text, numbers
                // and the kind name.
                prop_assert!(shown.is_ascii());
                let trimmed = raw.trim();
                if trimmed.chars().count() >= 6 {
                    prop_assert!(!shown.contains(trimmed));
                }
            }
        }
    }
}
