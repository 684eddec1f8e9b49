//! Bills over final records (a subscriber-side view: the store's records and device totals,
//! or a recording's replay) and their plots. Pricing itself is [`crate::bill`].

pub mod bill;
pub mod plots;

pub use self::bill::{Bill, By, Group, Interval, Line, bill};
