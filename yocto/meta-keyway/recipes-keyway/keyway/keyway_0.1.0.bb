SUMMARY = "keyway door gateway: phones open doors (Aliro over NFC, OSDP to the panel)"
DESCRIPTION = "Authenticates Aliro phones over NFC or BLE, checks an ACL in SQLite, sends the card to the panel over OSDP."
# nooelint: oelint.vars.homepageping - placeholder domain; set your project's page
HOMEPAGE = "https://keyway.invalid"
BUGTRACKER = "https://keyway.invalid/issues"
SECTION = "net"
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://LICENSE;md5=3b83ef96387f14655fc854ddc3c6bd57"

DEPENDS += "dbus pcsc-lite"

# Point KEYWAY_SRC_URI at your keyway git server and pin the revision in local.conf, e.g.
#   KEYWAY_SRC_URI = "git://git.internal/keyway.git;protocol=ssh;branch=main"
#   SRCREV:pn-keyway = "<commit>"
# (no AUTOREV default: an image must say which keyway it contains).
KEYWAY_SRC_URI ??= ""
SRC_URI = "${KEYWAY_SRC_URI}"
S = "${UNPACKDIR}/git"

inherit cargo cargo-update-recipe-crates systemd useradd

require ${BPN}-crates.inc

# Only the daemon/CLI; the phone emulator is a test peer. keyway's release profile does not
# strip: Yocto strips and splits the debug info itself.
CARGO_BUILD_FLAGS:append = " --bin keyway"

SYSTEMD_SERVICE:${PN} = "keyway.service"
SYSTEMD_AUTO_ENABLE = "enable"

USERADD_PACKAGES = "${PN}"
USERADD_PARAM:${PN} = "--system --home-dir ${localstatedir}/lib/keyway --no-create-home --shell /bin/false --groups dialout --user-group keyway"

do_install:append() {
    install -d ${D}${systemd_system_unitdir}
    install -m 0644 ${S}/systemd/keyway.service ${D}${systemd_system_unitdir}/
    install -d ${D}${systemd_unitdir}/catalog
    install -m 0644 ${S}/systemd/keyway.catalog ${D}${systemd_unitdir}/catalog/
    install -d -m 0750 ${D}${sysconfdir}/keyway ${D}${sysconfdir}/keyway/keys
    install -m 0640 ${S}/packaging/keyway.toml ${D}${sysconfdir}/keyway/keyway.toml
    chgrp -R keyway ${D}${sysconfdir}/keyway
}

CONFFILES:${PN} = "${sysconfdir}/keyway/keyway.toml"
FILES:${PN} += "${systemd_system_unitdir}/keyway.service ${systemd_unitdir}/catalog/keyway.catalog"
RDEPENDS:${PN} += "bluez5 pcsc-lite"
# A CVE feed names keyway itself.
CVE_PRODUCT = "keyway"
