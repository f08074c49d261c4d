//! Aliro 1.0 protocol constants: AIDs, command headers, TLV tags, key-schedule labels,
//! reader status codes and endpoint status words (from the public Aliro write-ups:
//! kormax/aliro and aliro-access-control/aliro-actuator).

/// Expedited-phase application identifier (SELECT before AUTH0).
pub const AID_EXPEDITED: [u8; 9] = [0xA0, 0x00, 0x00, 0x09, 0x09, 0xAC, 0xCE, 0x55, 0x01];
/// Step-up-phase application identifier.
pub const AID_STEP_UP: [u8; 9] = [0xA0, 0x00, 0x00, 0x09, 0x09, 0xAC, 0xCE, 0x55, 0x02];

/// The only protocol version this implementation speaks.
pub const PROTOCOL_VERSION_1_0: [u8; 2] = [0x01, 0x00];

/// Interface byte entering every salt: NFC.
pub const INTERFACE_NFC: u8 = 0x5E;
/// Interface byte entering every salt: BLE.
pub const INTERFACE_BLE: u8 = 0xC3;

/// Class byte of ISO interindustry commands (SELECT, ENVELOPE, GET RESPONSE).
pub const CLA_ISO: u8 = 0x00;
/// Class byte of Aliro proprietary commands.
pub const CLA_PROPRIETARY: u8 = 0x80;
/// Command chaining bit, set in CLA on all but the last block.
pub const CLA_CHAINING: u8 = 0x10;

pub const INS_SELECT: u8 = 0xA4;
pub const INS_AUTH0: u8 = 0x80;
pub const INS_AUTH1: u8 = 0x81;
pub const INS_LOAD_CERT: u8 = 0xD1;
pub const INS_EXCHANGE: u8 = 0xC9;
pub const INS_CONTROL_FLOW: u8 = 0x3C;
pub const INS_ENVELOPE: u8 = 0xC3;
pub const INS_GET_RESPONSE: u8 = 0xC0;

/// SELECT by DF name, first or only occurrence.
pub const SELECT_P1_BY_NAME: u8 = 0x04;
pub const SELECT_P2_FIRST: u8 = 0x00;

/// TLV tags.
pub mod tag {
    /// SELECT response: FCI template.
    pub const FCI: u32 = 0x6F;
    /// SELECT response: DF name (AID).
    pub const DF_NAME: u32 = 0x84;
    /// SELECT response: FCI proprietary template (enters every salt).
    pub const FCI_PROPRIETARY: u32 = 0xA5;
    /// Inside A5: application type.
    pub const APPLICATION_TYPE: u32 = 0x80;
    /// Inside A5: supported versions; in AUTH0: selected version.
    pub const PROTOCOL_VERSIONS: u32 = 0x5C;
    /// Inside A5: extended length information (max command / response APDU).
    pub const EXTENDED_LENGTH_INFO: u32 = 0x7F66;
    /// Inside A5: vendor data.
    pub const VENDOR_FCI: u32 = 0xB3;

    /// AUTH0 / AUTH1 / CONTROL FLOW: command parameters (AUTH0, AUTH1), S1 (CONTROL FLOW).
    pub const COMMAND_PARAMETERS: u32 = 0x41;
    /// AUTH0: authentication policy; CONTROL FLOW: S2.
    pub const AUTH_POLICY: u32 = 0x42;
    /// CONTROL FLOW: domain-specific data.
    pub const CONTROL_FLOW_DOMAIN: u32 = 0x43;
    /// Transaction identifier (16 bytes).
    pub const TRANSACTION_ID: u32 = 0x4C;
    /// Reader identifier: group id || sub id (32 bytes).
    pub const READER_ID: u32 = 0x4D;
    /// Endpoint ephemeral public key (AUTH0 response) / X coordinate in preimages.
    pub const ENDPOINT_EPHEMERAL: u32 = 0x86;
    /// Reader ephemeral public key (AUTH0 command) / X coordinate in preimages.
    pub const READER_EPHEMERAL: u32 = 0x87;
    /// Usage context in signature preimages.
    pub const USAGE: u32 = 0x93;
    /// AUTH0 response: FAST cryptogram (64 bytes).
    pub const CRYPTOGRAM: u32 = 0x9D;
    /// AUTH1 command / response: signature r||s.
    pub const SIGNATURE: u32 = 0x9E;
    /// AUTH1 command: reader certificate.
    pub const READER_CERTIFICATE: u32 = 0x90;
    /// AUTH0 command vendor extension.
    pub const AUTH0_VENDOR_EXTENSION: u32 = 0xB1;
    /// AUTH0 response vendor extension.
    pub const AUTH0_RESPONSE_VENDOR_EXTENSION: u32 = 0xB2;
    /// AUTH1 response: endpoint long-term public key (65 bytes).
    pub const ENDPOINT_PUBLIC_KEY: u32 = 0x5A;
    /// AUTH1 response: key slot (8 bytes).
    pub const KEY_SLOT: u32 = 0x4E;
    /// AUTH1 response: private mailbox data.
    pub const MAILBOX_DATA: u32 = 0x4B;
    /// AUTH1 response / FAST cryptogram plaintext: signaling bitmap (2 bytes).
    pub const SIGNALING_BITMAP: u32 = 0x5E;
    /// AUTH1 response: credential signed timestamp.
    pub const CREDENTIAL_TIMESTAMP: u32 = 0x91;
    /// AUTH1 response: revocation signed timestamp.
    pub const REVOCATION_TIMESTAMP: u32 = 0x92;
    /// EXCHANGE: reader status (2 bytes).
    pub const READER_STATUS: u32 = 0x97;
    /// EXCHANGE: URSK request (empty).
    pub const URSK_REQUEST: u32 = 0x98;
    /// ENVELOPE: session data.
    pub const SESSION_DATA: u32 = 0x53;
}

/// Usage constant (tag 93) in the reader signature preimage.
pub const USAGE_READER_SIGNATURE: [u8; 4] = [0x41, 0x5D, 0x95, 0x69];
/// Usage constant (tag 93) in the device signature preimage.
pub const USAGE_DEVICE_SIGNATURE: [u8; 4] = [0x4E, 0x88, 0x7B, 0x4C];

/// Salt labels (12 ASCII bytes each).
pub const LABEL_VOLATILE: &[u8; 12] = b"Volatile****";
pub const LABEL_PERSISTENT: &[u8; 12] = b"Persistent**";
pub const LABEL_VOLATILE_FAST: &[u8; 12] = b"VolatileFast";

/// HKDF info strings for the step-up and BLE session keys.
pub const INFO_SK_READER: &[u8] = b"SKReader";
pub const INFO_SK_DEVICE: &[u8] = b"SKDevice";
pub const INFO_BLE_SK_READER: &[u8] = b"BleSKReader";
pub const INFO_BLE_SK_DEVICE: &[u8] = b"BleSKDevice";

/// AUTH0 tag 41 bit 0: request FAST (cryptogram).
pub const AUTH0_FAST: u8 = 0x01;
/// AUTH0 tag 41: standard transaction.
pub const AUTH0_STANDARD: u8 = 0x00;
/// AUTH1 tag 41 bit 0: return the endpoint public key (5A) rather than a key slot (4E).
pub const AUTH1_REQUEST_PUBLIC_KEY: u8 = 0x01;

/// Authentication policy (AUTH0 tag 42).
pub const AUTH_POLICY_USER_DEVICE_SETTING: u8 = 0x01;
pub const AUTH_POLICY_SECURE_ACTION: u8 = 0x02;
pub const AUTH_POLICY_FORCE_USER_AUTH: u8 = 0x03;

/// Signaling bitmap (tag 5E) bit keyway reads as "the user was verified on the device
/// (biometric/PIN) for this transaction".
///
/// Assumption: the public reference (vectors' `reference_constants.json`) names bits 0-7 and
/// 9-12 (documents, mailbox, notify, update) and none for user verification; bit 8 is the one
/// it leaves unassigned between them. A sensitive door also sends AUTH0 policy 03 (force user
/// authentication), which enters the session keys, so a phone cannot claim to have seen a
/// weaker policy. Change this constant if the specification assigns another bit.
pub const SIGNALING_USER_VERIFIED_BIT: u16 = 1 << 8;

/// CONTROL FLOW S1: transaction finished with failure.
pub const CONTROL_FLOW_S1_FAILURE: u8 = 0x00;
/// CONTROL FLOW S2: no further information.
pub const CONTROL_FLOW_S2_NONE: u8 = 0x00;
/// CONTROL FLOW S2: protocol version not supported.
pub const CONTROL_FLOW_S2_VERSION_NOT_SUPPORTED: u8 = 0x27;

/// Endpoint status words.
pub mod sw {
    pub const OK: u16 = 0x9000;
    /// SW1 of "more data available, send GET RESPONSE".
    pub const MORE_DATA_SW1: u8 = 0x61;
    pub const COMMAND_NOT_COMPLIANT: u16 = 0x6701;
    pub const SECURITY_STATUS_NOT_SATISFIED: u16 = 0x6982;
    pub const CONDITIONS_NOT_SATISFIED: u16 = 0x6985;
    pub const APPLICATION_NOT_FOUND: u16 = 0x6A82;
    pub const INCORRECT_P1P2: u16 = 0x6A86;
    pub const REFERENCED_DATA_NOT_FOUND: u16 = 0x6A88;
    pub const INS_NOT_SUPPORTED: u16 = 0x6D00;
    pub const CLA_NOT_SUPPORTED: u16 = 0x6E00;
}

/// Reader status sent in EXCHANGE tag 97 (2 bytes, big-endian).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReaderStatus {
    FailureNoInformation,
    PublicKeyNotFound,
    PublicKeyExpired,
    PublicKeyNotTrusted,
    InvalidSignature,
    InvalidDataFormat,
    InvalidDataContent,
    StatusWordError,
    NoKeySlotInResponse,
    NoPublicKeyInResponse,
    NoSignaturePresent,
    InvalidAccessRights,
    HardwareIssue,
    ProtocolVersionNotSupported,
    /// Access granted; the door stays (or becomes) locked/secured.
    StateSecured,
    /// Access granted; the door is unlocked/unsecured.
    StateUnsecured,
    Jammed,
    EnteringSecure,
    EnteringUnsecure,
    StateUnknown,
    /// Any other code (received from a peer, or vendor-specific).
    Other(u16),
}

#[allow(non_upper_case_globals)] // Named like variants: they read as statuses at call sites.
impl ReaderStatus {
    /// The status keyway sends to close a granted transaction: reader state "unsecured"
    /// (door unlocked), as both reference readers send on success.
    pub const AccessGranted: ReaderStatus = ReaderStatus::StateUnsecured;
    /// The status for an endpoint that is known but not admitted (expired, wrong door, outside
    /// its validity): "invalid access rights". Unknown keys use [`ReaderStatus::PublicKeyNotFound`].
    pub const AccessDenied: ReaderStatus = ReaderStatus::InvalidAccessRights;

    /// The 2-byte code.
    pub fn code(self) -> u16 {
        match self {
            ReaderStatus::FailureNoInformation => 0x0000,
            ReaderStatus::PublicKeyNotFound => 0x0001,
            ReaderStatus::PublicKeyExpired => 0x0002,
            ReaderStatus::PublicKeyNotTrusted => 0x0003,
            ReaderStatus::InvalidSignature => 0x0004,
            ReaderStatus::InvalidDataFormat => 0x0006,
            ReaderStatus::InvalidDataContent => 0x0007,
            ReaderStatus::StatusWordError => 0x0020,
            ReaderStatus::NoKeySlotInResponse => 0x0021,
            ReaderStatus::NoPublicKeyInResponse => 0x0022,
            ReaderStatus::NoSignaturePresent => 0x0023,
            ReaderStatus::InvalidAccessRights => 0x0025,
            ReaderStatus::HardwareIssue => 0x0026,
            ReaderStatus::ProtocolVersionNotSupported => 0x0027,
            ReaderStatus::StateSecured => 0x0100,
            ReaderStatus::StateUnsecured => 0x0101,
            ReaderStatus::Jammed => 0x0102,
            ReaderStatus::EnteringSecure => 0x0180,
            ReaderStatus::EnteringUnsecure => 0x0181,
            ReaderStatus::StateUnknown => 0x0182,
            ReaderStatus::Other(c) => c,
        }
    }

    /// Decodes a 2-byte code (unknown codes become [`ReaderStatus::Other`]).
    pub fn from_code(code: u16) -> Self {
        const KNOWN: [ReaderStatus; 20] = [
            ReaderStatus::FailureNoInformation,
            ReaderStatus::PublicKeyNotFound,
            ReaderStatus::PublicKeyExpired,
            ReaderStatus::PublicKeyNotTrusted,
            ReaderStatus::InvalidSignature,
            ReaderStatus::InvalidDataFormat,
            ReaderStatus::InvalidDataContent,
            ReaderStatus::StatusWordError,
            ReaderStatus::NoKeySlotInResponse,
            ReaderStatus::NoPublicKeyInResponse,
            ReaderStatus::NoSignaturePresent,
            ReaderStatus::InvalidAccessRights,
            ReaderStatus::HardwareIssue,
            ReaderStatus::ProtocolVersionNotSupported,
            ReaderStatus::StateSecured,
            ReaderStatus::StateUnsecured,
            ReaderStatus::Jammed,
            ReaderStatus::EnteringSecure,
            ReaderStatus::EnteringUnsecure,
            ReaderStatus::StateUnknown,
        ];
        KNOWN
            .iter()
            .copied()
            .find(|s| s.code() == code)
            .unwrap_or(ReaderStatus::Other(code))
    }

    /// True for the reader-state codes (01xx) that report a granted transaction.
    pub fn is_reader_state(self) -> bool {
        self.code() & 0xFF00 == 0x0100
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_status_codes_round_trip() {
        for code in 0u16..=0x0200 {
            assert_eq!(ReaderStatus::from_code(code).code(), code);
        }
        assert_eq!(
            ReaderStatus::from_code(0x0101),
            ReaderStatus::StateUnsecured
        );
        assert_eq!(
            ReaderStatus::from_code(0x0007),
            ReaderStatus::InvalidDataContent
        );
        assert_eq!(ReaderStatus::from_code(0x0005), ReaderStatus::Other(5));
        assert!(ReaderStatus::StateUnsecured.is_reader_state());
        assert!(ReaderStatus::AccessGranted.is_reader_state());
        assert_eq!(ReaderStatus::AccessDenied.code(), 0x0025);
        assert!(!ReaderStatus::PublicKeyNotFound.is_reader_state());
    }

    #[test]
    fn aids_differ_only_in_last_byte() {
        assert_eq!(AID_EXPEDITED[..8], AID_STEP_UP[..8]);
        assert_ne!(AID_EXPEDITED[8], AID_STEP_UP[8]);
    }
}
