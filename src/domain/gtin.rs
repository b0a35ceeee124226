//! GS1 Global Trade Item Numbers: parsing, check-digit validation and
//! normalisation to 14 digits.

use std::fmt;

/// A GTIN with a valid check digit, normalised to 14 digits (GTIN-14 form).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Gtin(String);

impl Gtin {
    /// Parses a GTIN-8, -12, -13 or -14 and validates its GS1 check digit.
    /// The error says what is wrong, for an `INVALID_ARGUMENT` reason.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("required".into());
        }
        if !s.bytes().all(|b| b.is_ascii_digit()) {
            let shown: String = s.chars().take(20).collect();
            return Err(format!("must contain only digits, got {shown:?}"));
        }
        if ![8, 12, 13, 14].contains(&s.len()) {
            return Err(format!("must have 8, 12, 13 or 14 digits, got {}", s.len()));
        }
        let digits: Vec<u32> = s.bytes().map(|b| u32::from(b - b'0')).collect();
        let (data, check) = digits.split_at(digits.len() - 1);
        let expected = check_digit(data);
        if check[0] != expected {
            return Err(format!(
                "check digit is {} but should be {expected}",
                check[0]
            ));
        }
        Ok(Gtin(format!("{s:0>14}")))
    }

    /// The 14-digit form.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The GTIN-13 form (without the leading indicator digit), against which
    /// GS1 company prefixes are matched.
    pub fn gtin13(&self) -> &str {
        &self.0[1..]
    }

    /// Whether the GS1 company prefix `prefix` owns this GTIN.
    pub fn has_company_prefix(&self, prefix: &str) -> bool {
        self.gtin13().starts_with(prefix)
    }
}

impl fmt::Display for Gtin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The GS1 check digit of the data digits (weights 3,1,3,… from the right).
pub fn check_digit(data: &[u32]) -> u32 {
    let sum: u32 = data
        .iter()
        .rev()
        .enumerate()
        .map(|(i, d)| if i % 2 == 0 { d * 3 } else { *d })
        .sum();
    (10 - sum % 10) % 10
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_each_length_and_normalises() {
        assert_eq!(Gtin::parse("96385074").unwrap().as_str(), "00000096385074");
        assert_eq!(
            Gtin::parse("036000291452").unwrap().as_str(),
            "00036000291452"
        );
        assert_eq!(
            Gtin::parse("4006381333931").unwrap().as_str(),
            "04006381333931"
        );
        assert_eq!(
            Gtin::parse("10012345678902").unwrap().as_str(),
            "10012345678902"
        );
    }

    #[test]
    fn rejects_bad_check_digit_length_and_characters() {
        assert!(Gtin::parse("4006381333932")
            .unwrap_err()
            .contains("check digit"));
        assert!(Gtin::parse("40063813339").unwrap_err().contains("digits"));
        assert!(Gtin::parse("40063813339a1")
            .unwrap_err()
            .contains("only digits"));
        assert!(Gtin::parse("").unwrap_err().contains("required"));
    }

    #[test]
    fn company_prefix_matches_the_gtin13_form() {
        let g = Gtin::parse("4740001000017").unwrap();
        assert_eq!(g.as_str(), "04740001000017");
        assert!(g.has_company_prefix("4740001"));
        assert!(!g.has_company_prefix("0474"));
    }
}
