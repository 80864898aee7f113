#!/usr/bin/perl

# Tests for sni_guard: server names are validated and normalised before anything
# else.  Valid names are looked up in their normalised form; invalid names and
# malformed server_name extensions are refused with internal_error (80), with no
# lookup.  Every row of data/sni-names.tsv is a case.

###############################################################################

use warnings;
use strict;

use Test::More;

BEGIN { use FindBin; chdir($FindBin::Bin); }

use lib 'lib';
use Test::Nginx;
use Test::Nginx::SNIGuard qw/ :all /;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new()->has(qw/http http_ssl/)->has_daemon('openssl');

# Rows of the shared table: [ sni, class, normalised, why ].
open my $tsv, '<', 'data/sni-names.tsv' or die "Can't open data/sni-names.tsv: $!";
my @rows = map { chomp; [ split /\t/, $_, -1 ] } grep { !/^#/ && /\S/ } <$tsv>;
close $tsv;

# More of the published policy, beyond the shared table: [ sni, normalised or undef, why ].
my @policy = (
	[ "shop.example.com", 'shop.example.com', 'plain name' ],
	[ "xn--80ak6aa92e.com", 'xn--80ak6aa92e.com', 'punycode label' ],
	[ "a-b.example", 'a-b.example', 'hyphen inside a label' ],
	[ "123.example", '123.example', 'all-digit label that is not the last' ],
	[ "localhost", 'localhost', 'single label' ],
	[ "_acme.example.com", undef, 'underscore' ],
	[ "a_b.example.com", undef, 'underscore inside a label' ],
	[ "-a.example.com", undef, 'label starting with a hyphen' ],
	[ "a-.example.com", undef, 'label ending with a hyphen' ],
	[ "example.123", undef, 'all-digit last label' ],
	[ "127.0.0.1", undef, 'loopback IPv4 literal' ],
	[ "exa\x00mple.com", undef, 'NUL byte' ],
	[ "ex\xc3\xa4mple.com", undef, 'non-ASCII bytes' ],
	[ "a b.example", undef, 'space' ],
	[ "*.example.com", undef, 'wildcard' ],
	[ ".example.com", undef, 'empty first label' ],
	[ ".", undef, 'lone dot' ],
	[ "example.com:443", undef, 'port suffix' ],
	[ ('a' x 63 . '.') x 4 . 'com', undef, 'over 255 bytes' ],
);

# Malformed server_name extensions: [ raw extension body, why ].
my @malformed = (
	[ "", 'empty extension' ],
	[ "\x00", 'truncated list length' ],
	[ "\x00\x10\x00\x00\x03abc", 'list length past the end' ],
	[ "\x00\x05\x00\x00\x03abc\x00", 'list length short of the end' ],
	[ "\x00\x00", 'empty list' ],
	[ "\x00\x06\x01\x00\x03abc", 'name type other than host_name' ],
	[ "\x00\x06\x00\x00\x09abc", 'host name length past the end' ],
	[ "\x00\x03\x00\x00\x00", 'empty host name' ],
	[ "\x00\x0c\x00\x00\x03abc\x00\x00\x03def", 'two names' ],
);

my @registered = grep { defined } map({ $_->[1] eq 'allow-form' ? $_->[2] : () } @rows),
	map { $_->[1] } @policy;

$t->write_file_expand('nginx.conf', <<'EOF');

%%TEST_GLOBALS%%

daemon off;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    sni_guard_zone guard:1m;
    sni_guard_lookup http://127.0.0.1:%%PORT_8081%%/check;

    server {
        listen       127.0.0.1:8443 ssl;
        server_name  localhost;

        ssl_certificate     localhost.crt;
        ssl_certificate_key localhost.key;

        sni_guard on;

        location / {
            return 200 "name $ssl_server_name";
        }
    }
}

EOF

my $d = $t->testdir();
make_cert($d, 'localhost');
lookup_conf($d, registered => \@registered);

$t->run_daemon(\&lookup_daemon, port(8081), $d);
$t->waitforfile("$d/lookup.pid") or die "lookup service did not start";

$t->plan(2 * @rows + 2 * @policy + @malformed + 5)->run();

###############################################################################

my $port = port(8443);

sub probe {
	my ($what, %hello) = @_;
	my $before = scalar lookups($d);
	my $r = client_hello($port, %hello);
	my $outcome = $r->{outcome} eq 'alert'
		? "alert $r->{alert}" : $r->{outcome};
	return ($outcome, [ (lookups($d))[$before .. scalar(lookups($d)) - 1] ]);
}

# nginx 1.29.2 and later check the server_name extension in a ClientHello callback
# of their own, which runs before the guard's: malformed extensions get nginx's
# decode_error (50), names with NUL bytes or over 255 bytes its unrecognized_name
# (112). Earlier versions leave them to the guard's internal_error (80).
my $nginx_checks_first = $t->has_version('1.29.2');

sub nginx_alert {
	my ($sni) = @_;
	return $nginx_checks_first && ($sni =~ /\x00/ || length($sni) > 255) ? 112 : 80;
}

sub check_name {
	my ($sni, $normalised, $why) = @_;
	my ($outcome, $new) = probe($why, sni => $sni);

	if (defined $normalised) {
		is($outcome, 'handshake', "$why: handshake goes on");
		is(lookup_count($d, $normalised), 1,
			"$why: looked up once, as \"$normalised\"");

	} else {
		my $alert = nginx_alert($sni);
		is($outcome, "alert $alert", "$why: refused with alert $alert");
		is(scalar @$new, 0, "$why: no lookup");
	}
}

for my $row (@rows) {
	my ($sni, $class, $normalised, $why) = @$row;
	check_name($sni, $class eq 'allow-form' ? $normalised : undef, "table: $why");
}

check_name(@$_) for @policy;

for my $case (@malformed) {
	my ($ext, $why) = @$case;
	my ($outcome, $new) = probe($why, ext => $ext);
	my $alert = $nginx_checks_first && $why ne 'empty host name' ? 50 : 80;
	is("$outcome, " . scalar(@$new) . " lookups", "alert $alert, 0 lookups",
		"malformed extension, $why: refused before OpenSSL parses it");
}

# what a real TLS client sees

my $r = tls_get($port, 'portal.example.com');
like($r->{body}, qr/name portal.example.com/, 'registered name: page served');

$r = tls_get($port, 'unknown.example.com');
like($r->{error}, qr/tlsv1 alert internal error/,
	'unregistered name: client sees "tlsv1 alert internal error"');

$r = tls_get($port, 'Unknown.Example.COM.');
is(lookup_count($d, 'unknown.example.com'), 1,
	'other spelling of a refused name: answered from the cache');

my @logged = lookups($d);
is(scalar(grep { !m!^/check\?domain=[a-z0-9.-]+$! } @logged), 0,
	'every lookup carries a normalised name');

like($t->read_file('error.log'),
	qr/sni_guard refused "_acme\.example\.com": underscore/,
	'refusal logged with the name and the reason');

###############################################################################
