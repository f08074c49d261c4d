SUMMARY = "keyway door gateway: phones open doors (Aliro over NFC, OSDP to the panel)"
HOMEPAGE = "https://keyway.invalid"
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://LICENSE;md5=3b83ef96387f14655fc854ddc3c6bd57"

# Point KEYWAY_SRC_URI at your keyway git server in local.conf, with the revision to build, e.g.
#   KEYWAY_SRC_URI = "git://git.internal/keyway.git;protocol=ssh;branch=main"
#   SRCREV_pn-keyway = "<commit>"
KEYWAY_SRC_URI ??= ""
SRC_URI = "${KEYWAY_SRC_URI}"
SRCREV ??= "${AUTOREV}"
S = "${WORKDIR}/git"

inherit cargo cargo-update-recipe-crates systemd useradd

require ${BPN}-crates.inc

DEPENDS += "pcsc-lite dbus"
RDEPENDS:${PN} += "pcsc-lite bluez5"

# keyway's release profile does not strip; Yocto strips and splits debug info itself.
CARGO_BUILD_FLAGS:append = " --bin keyway"

SYSTEMD_SERVICE:${PN} = "keyway.service"
SYSTEMD_AUTO_ENABLE = "enable"

USERADD_PACKAGES = "${PN}"
USERADD_PARAM:${PN} = "--system --home-dir /var/lib/keyway --no-create-home --shell /bin/false --groups dialout --user-group keyway"

do_install:append() {
    install -d ${D}${systemd_system_unitdir}
    install -m 0644 ${S}/systemd/keyway.service ${D}${systemd_system_unitdir}/
    install -d -m 0750 ${D}${sysconfdir}/keyway ${D}${sysconfdir}/keyway/keys
    install -m 0640 ${S}/packaging/keyway.toml ${D}${sysconfdir}/keyway/keyway.toml
    chgrp -R keyway ${D}${sysconfdir}/keyway
}

CONFFILES:${PN} = "${sysconfdir}/keyway/keyway.toml"
FILES:${PN} += "${systemd_system_unitdir}/keyway.service"
