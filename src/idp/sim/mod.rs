//! Loopback identity-provider simulator speaking the BankID RP v6 wire protocol.
