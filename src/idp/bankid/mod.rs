//! Swedish BankID RP API v6.0 client (phone/auth, collect, cancel) over mutual TLS.
