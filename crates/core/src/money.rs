//! Money: ISO 4217 currency codes and amounts in integer minor units.
//!
//! Amounts are `i64` minor units. A transfer amount is `1..=AMOUNT_MAX`
//! (2^53 − 1, the largest integer a JSON number carries exactly). Every
//! balance change uses checked arithmetic: an overflow is an error, never a wrap.

use std::fmt;

/// The largest amount one transfer may carry: 2^53 − 1 minor units.
pub const AMOUNT_MAX: i64 = (1 << 53) - 1;

/// The active ISO 4217 alphabetic codes (funds and precious-metal codes excluded).
const ISO_4217: &[&str] = &[
    "AED", "AFN", "ALL", "AMD", "ANG", "AOA", "ARS", "AUD", "AWG", "AZN", "BAM", "BBD", "BDT", "BGN", "BHD", "BIF",
    "BMD", "BND", "BOB", "BRL", "BSD", "BTN", "BWP", "BYN", "BZD", "CAD", "CDF", "CHF", "CLP", "CNY", "COP", "CRC",
    "CUP", "CVE", "CZK", "DJF", "DKK", "DOP", "DZD", "EGP", "ERN", "ETB", "EUR", "FJD", "FKP", "GBP", "GEL", "GHS",
    "GIP", "GMD", "GNF", "GTQ", "GYD", "HKD", "HNL", "HTG", "HUF", "IDR", "ILS", "INR", "IQD", "IRR", "ISK", "JMD",
    "JOD", "JPY", "KES", "KGS", "KHR", "KMF", "KPW", "KRW", "KWD", "KYD", "KZT", "LAK", "LBP", "LKR", "LRD", "LSL",
    "LYD", "MAD", "MDL", "MGA", "MKD", "MMK", "MNT", "MOP", "MRU", "MUR", "MVR", "MWK", "MXN", "MYR", "MZN", "NAD",
    "NGN", "NIO", "NOK", "NPR", "NZD", "OMR", "PAB", "PEN", "PGK", "PHP", "PKR", "PLN", "PYG", "QAR", "RON", "RSD",
    "RUB", "RWF", "SAR", "SBD", "SCR", "SDG", "SEK", "SGD", "SHP", "SLE", "SOS", "SRD", "SSP", "STN", "SVC", "SYP",
    "SZL", "THB", "TJS", "TMT", "TND", "TOP", "TRY", "TTD", "TWD", "TZS", "UAH", "UGX", "USD", "UYU", "UZS", "VED",
    "VES", "VND", "VUV", "WST", "XAF", "XCD", "XCG", "XOF", "XPF", "YER", "ZAR", "ZMW", "ZWG",
];

/// An ISO 4217 alphabetic currency code such as `CNY`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Currency([u8; 3]);

/// The string is not an active ISO 4217 code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("currency must be an ISO 4217 code such as CNY or USD")]
pub struct CurrencyError;

impl Currency {
    pub fn new(code: &str) -> Result<Self, CurrencyError> {
        let known = ISO_4217.binary_search(&code).is_ok();
        match code.as_bytes() {
            &[a, b, c] if known => Ok(Self([a, b, c])),
            _ => Err(CurrencyError),
        }
    }

    /// Rebuilds a currency from its three bytes, as stored by the codec.
    pub fn from_bytes(bytes: [u8; 3]) -> Result<Self, CurrencyError> {
        let code = std::str::from_utf8(&bytes).map_err(|_| CurrencyError)?;
        Self::new(code)
    }

    pub fn bytes(self) -> [u8; 3] {
        self.0
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("Currency holds three ASCII letters by construction")
    }
}

impl fmt::Debug for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// True when `amount` may be moved by one transfer.
pub fn amount_is_valid(amount: i64) -> bool {
    (1..=AMOUNT_MAX).contains(&amount)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_code_table_is_sorted_so_binary_search_is_right() {
        assert!(ISO_4217.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn currencies_are_iso_codes() {
        assert_eq!(Currency::new("CNY").unwrap().as_str(), "CNY");
        assert!(Currency::new("cny").is_err());
        assert!(Currency::new("XYZ").is_err());
        assert!(Currency::new("US").is_err());
        assert!(Currency::from_bytes(*b"EUR").is_ok());
        assert!(Currency::from_bytes([0xff, 0, 1]).is_err());
    }

    #[test]
    fn amounts_are_positive_and_fit_a_json_number() {
        assert!(!amount_is_valid(0));
        assert!(!amount_is_valid(-1));
        assert!(amount_is_valid(1));
        assert!(amount_is_valid(AMOUNT_MAX));
        assert!(!amount_is_valid(AMOUNT_MAX + 1));
    }
}
