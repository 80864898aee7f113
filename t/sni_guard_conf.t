#!/usr/bin/perl

# Tests for sni_guard: configurations that nginx -t must refuse, each with an
# [emerg] message that says what is wrong and where, and configurations it must
# accept, nginx-conf/demo.conf among them.  Every row of @cases is one
# configuration file, tested with nginx -t; nginx itself is never started.

###############################################################################

use warnings;
use strict;

use Test::More;

use POSIX ();

BEGIN { use FindBin; chdir($FindBin::Bin); }

use lib 'lib';
use Test::Nginx;
use Test::Nginx::SNIGuard qw/ make_cert /;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new()->has(qw/http http_ssl/)->has_daemon('openssl');

# Where a row's snippets go; each place is one line of the template below, marked
# with "# @place" so that its line number can be found after the harness has
# expanded %%TEST_GLOBALS%%.  The -block places are the lines of the two
# "server {" openings, where nginx records a server's location.
my @places = qw/ main http server location server2 /;

my $template = <<'EOF';

%%TEST_GLOBALS%%

@main@ # @main

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    ssl_certificate     localhost.crt;
    ssl_certificate_key localhost.key;

    @http@ # @http

    server { # @server-block
        listen       127.0.0.1:%%PORT_8443%% ssl;
        server_name  localhost;

        @server@ # @server

        location / {
            @location@ # @location
            return 204;
        }
    }

    server { # @server2-block
        listen       127.0.0.1:%%PORT_8443%% ssl;
        server_name  other.example;

        @server2@ # @server2
    }
}

EOF

my $lookup = 'http://127.0.0.1:%%PORT_8081%%/check';
my $ready = "sni_guard_zone guard:1m; sni_guard_lookup $lookup;";

# A host name no resolver can be asked about: glibc refuses a label over 63
# bytes before it sends a query, so this fails without leaving the machine.
my $unresolvable = ('a' x 64) . '.invalid';

# Rows: [ places joined by "+", snippet (array ref for several places), expected
# [emerg] message or undef when nginx -t must pass, what the case is ].  In the
# message, @dir is the test directory and @place the file and line of that place
# of the template; the message must end there, as nginx's own messages do.
my @cases = (

	# sni_guard

	[ 'server', 'sni_guard maybe;',
		'invalid value "maybe" in "sni_guard" directive, it must be "on" or "off"'
		. ' in @server',
		'sni_guard maybe' ],
	[ 'server', 'sni_guard on on;',
		'invalid number of arguments in "sni_guard" directive in @server',
		'sni_guard with two values' ],
	[ 'location', 'sni_guard on;',
		'"sni_guard" directive is not allowed here in @location',
		'sni_guard in a location' ],
	[ 'main', 'sni_guard on;',
		'"sni_guard" directive is not allowed here in @main',
		'sni_guard outside http' ],

	# times

	[ 'server', 'sni_guard_timeout abc;',
		'"sni_guard_timeout" directive invalid value in @server',
		'sni_guard_timeout abc' ],
	[ 'server', 'sni_guard_valid -1;',
		'"sni_guard_valid" directive invalid value in @server',
		'sni_guard_valid -1' ],
	[ 'server', 'sni_guard_invalid 10x;',
		'"sni_guard_invalid" directive invalid value in @server',
		'sni_guard_invalid 10x' ],
	[ 'server', "sni_guard on; $ready sni_guard_timeout 0;",
		'"sni_guard_timeout" directive time must be more than 0 and at most 10s in @server',
		'sni_guard_timeout 0 with the guard on' ],

	# sni_guard_zone

	[ 'http', 'sni_guard_zone guard;',
		'"sni_guard_zone" directive invalid zone "guard", expected NAME:SIZE in @http',
		'zone without a size' ],
	[ 'http', 'sni_guard_zone :1m;',
		'"sni_guard_zone" directive invalid zone ":1m", expected NAME:SIZE in @http',
		'zone without a name' ],
	[ 'http', 'sni_guard_zone guard:abc;',
		'"sni_guard_zone" directive invalid zone size "guard:abc" in @http',
		'zone size abc' ],
	[ 'http', 'sni_guard_zone guard:1k;',
		'"sni_guard_zone" directive zone "guard" is too small, the minimum is 64k in @http',
		'zone of 1k' ],
	[ 'http', 'sni_guard_zone guard:1m; sni_guard_zone guard:1m;',
		'"sni_guard_zone" directive is duplicate in @http',
		'zone twice in one context' ],
	[ 'http+server', [ 'sni_guard_zone guard:1m;', 'sni_guard_zone guard:2m;' ],
		'the size 2097152 of shared memory zone "guard" conflicts with already'
		. ' declared size 1048576 in @server',
		'one zone name with two sizes' ],
	[ 'http', 'limit_req_zone $binary_remote_addr zone=guard:1m rate=1r/s;'
		. ' sni_guard_zone guard:1m;',
		'the shared memory zone "guard" is already declared for a different use'
		. ' in @http',
		'zone name taken by limit_req_zone' ],
	[ 'location', 'sni_guard_zone guard:1m;',
		'"sni_guard_zone" directive is not allowed here in @location',
		'sni_guard_zone in a location' ],

	# sni_guard_lookup

	[ 'http', 'sni_guard_lookup ftp://x/;',
		'"sni_guard_lookup" directive invalid URL "ftp://x/": unsupported url scheme "ftp" in @http',
		'lookup with the ftp scheme' ],
	[ 'http', 'sni_guard_lookup http://;',
		'"sni_guard_lookup" directive invalid URL "http://": url has no host in @http',
		'lookup without a host' ],
	[ 'http', 'sni_guard_lookup http://user@h/;',
		'"sni_guard_lookup" directive invalid URL "http://user@h/": user info in url is not allowed in @http',
		'lookup with user info' ],
	[ 'http', 'sni_guard_lookup http://h:99999/;',
		'"sni_guard_lookup" directive invalid URL "http://h:99999/": bad port in url in @http',
		'lookup with port 99999' ],
	[ 'http', 'sni_guard_lookup http://h/#frag;',
		'"sni_guard_lookup" directive invalid URL "http://h/#frag": fragment in url is not allowed in @http',
		'lookup with a fragment' ],
	[ 'http', "sni_guard_lookup http://$unresolvable/;",
		"\"sni_guard_lookup\" directive host not found in \"http://\Q$unresolvable\E/\": .* in \@http",
		'lookup host that does not resolve' ],
	[ 'http', "sni_guard_lookup $lookup; sni_guard_lookup $lookup;",
		'"sni_guard_lookup" directive is duplicate in @http',
		'lookup twice in one context' ],

	# what a server with the guard on needs

	[ 'server', "sni_guard on; sni_guard_lookup $lookup;",
		'no "sni_guard_zone" is defined for "sni_guard" in @server-block',
		'guard on, no zone anywhere' ],
	[ 'server', 'sni_guard on; sni_guard_zone guard:1m;',
		'no "sni_guard_lookup" is defined for "sni_guard" in @server-block',
		'guard on, no lookup anywhere' ],
	[ 'http', "sni_guard on; sni_guard_lookup $lookup;",
		'no "sni_guard_zone" is defined for "sni_guard" in @server-block',
		'guard on at http level, no zone: reported for the first server' ],
	[ 'http+server+server2', [ 'sni_guard on; sni_guard_zone guard:1m;',
			'sni_guard_lookup http://127.0.0.1:%%PORT_8081%%/a;',
			'sni_guard_lookup http://127.0.0.1:%%PORT_8082%%/b;' ],
		'zone "guard" is already used with lookup "http://127\.0\.0\.1:\d+/a";'
		. ' .*"http://127\.0\.0\.1:\d+/b".* for "sni_guard" in @server2-block',
		'one http-level zone, two lookups' ],

	# sni_guard_no_sni

	[ 'server', 'sni_guard_no_sni maybe;',
		'"sni_guard_no_sni" directive invalid value "maybe", it must be "allow" or "refuse"'
		. ' in @server',
		'sni_guard_no_sni maybe' ],

	# sni_guard_lookup_trusted_certificate

	[ 'server', "sni_guard on; $ready sni_guard_lookup_trusted_certificate missing.pem;",
		'cannot load "sni_guard_lookup_trusted_certificate" "@dir/missing\.pem"'
		. ' \(2: No such file or directory\) for "sni_guard" in @server-block',
		'trusted certificate file missing' ],
	[ 'server', "sni_guard on; $ready sni_guard_lookup_trusted_certificate text.pem;",
		'(?=.*@dir/text\.pem).*no certificate.* for "sni_guard" in @server-block',
		'trusted certificate file with no PEM block' ],
	[ 'server', "sni_guard on; $ready sni_guard_lookup_trusted_certificate key.pem;",
		'(?=.*@dir/key\.pem).*private key.* for "sni_guard" in @server-block',
		'trusted certificate file with a private key only' ],
	[ 'server', "sni_guard on; $ready sni_guard_lookup_trusted_certificate fifo.pem;",
		'cannot load "sni_guard_lookup_trusted_certificate" "@dir/fifo\.pem"'
		. ' \(not a regular file\) for "sni_guard" in @server-block',
		'trusted certificate file that is a FIFO: refused, not waited on' ],
	[ 'server', 'sni_guard_lookup_trusted_certificate "";',
		'"sni_guard_lookup_trusted_certificate" directive needs a file name in @server',
		'trusted certificate file with an empty name' ],

	# reliability

	[ 'server', "sni_guard on; $ready sni_guard_timeout 11s;",
		'"sni_guard_timeout" directive time must be more than 0 and at most 10s in @server',
		'sni_guard_timeout over 10s' ],
	[ 'server', 'sni_guard_lookup http://127.0.0.1:%%PORT_8081%%/check?domain=x;',
		'"sni_guard_lookup" directive invalid URL "http://127\.0\.0\.1:\d+/check\?domain=x": the module adds the'
		. ' "domain" parameter itself in @server',
		'sni_guard_lookup with a domain parameter of its own' ],
	[ 'server', 'sni_guard_lookup "http://127.0.0.1:%%PORT_8081%%/check?k=v;%64omain=x";',
		'"sni_guard_lookup" directive invalid URL "http://127\.0\.0\.1:\d+/check\?k=v;%64omain=x": the module adds the'
		. ' "domain" parameter itself in @server',
		'sni_guard_lookup with a domain parameter spelt otherwise' ],
	[ 'server', 'sni_guard_lookup "http://127.0.0.1:%%PORT_8081%%/check??domain%5B%5D=x";',
		'"sni_guard_lookup" directive invalid URL "http://127\.0\.0\.1:\d+/check\?\?domain%5B%5D=x":'
		. ' the module adds the "domain" parameter itself in @server',
		'sni_guard_lookup with a domain array after a second question mark' ],
	[ 'server', 'sni_guard_stale 50d;',
		'"sni_guard_stale" directive time must be at most 49d in @server',
		'sni_guard_stale over 49 days' ],
	[ 'server', 'sni_guard_lookup_rate 20r/s burst=1 burst=2;',
		'"sni_guard_lookup_rate" directive duplicate parameter "burst" in @server',
		'sni_guard_lookup_rate with burst twice' ],
	[ 'server', 'sni_guard_thread_pool "";',
		'"sni_guard_thread_pool" directive needs a thread pool\'s name in @server',
		'sni_guard_thread_pool with an empty name' ],
	[ 'server', 'sni_guard_stale abc;',
		'"sni_guard_stale" directive invalid value in @server',
		'sni_guard_stale abc' ],
	[ 'server', 'sni_guard_lookup_rate 0r/s;',
		'"sni_guard_lookup_rate" directive invalid rate "0r/s" in @server',
		'sni_guard_lookup_rate 0r/s' ],
	[ 'server', 'sni_guard_lookup_rate 20r/h;',
		'"sni_guard_lookup_rate" directive invalid rate "20r/h" in @server',
		'sni_guard_lookup_rate in requests per hour' ],
	[ 'server', 'sni_guard_lookup_rate 20r/s burst=x;',
		'"sni_guard_lookup_rate" directive invalid burst value "burst=x" in @server',
		'sni_guard_lookup_rate with a bad burst' ],
	[ 'server', 'sni_guard_lookup_rate 20r/s per_client=5;',
		'"sni_guard_lookup_rate" directive invalid per_client rate "per_client=5" in @server',
		'sni_guard_lookup_rate with a bad per_client' ],
	[ 'server', 'sni_guard_lookup_rate 20r/s delay=5;',
		'"sni_guard_lookup_rate" directive invalid parameter "delay=5" in @server',
		'sni_guard_lookup_rate with an unknown parameter' ],
	[ 'http+server+server2', [ "sni_guard on; $ready",
			'sni_guard_lookup_rate 10r/s;', 'sni_guard_lookup_rate 20r/s;' ],
		'zone "guard" is already used with another "sni_guard_lookup_rate"'
		. ' for "sni_guard" in @server2-block',
		'one zone, two lookup budgets' ],
	[ 'http+server+server2', [ "sni_guard on; sni_guard_zone guard:1m;"
			. " sni_guard_lookup https://127.0.0.1:%%PORT_8081%%/check;",
			'sni_guard_lookup_trusted_certificate ca.crt;',
			'sni_guard_lookup_trusted_certificate demo.crt;' ],
		'zone "guard" is already used with another "sni_guard_lookup_trusted_certificate"'
		. ' for "sni_guard" in @server2-block',
		'one zone, two trusted certificates' ],
	[ 'server', 'sni_guard_lookup_rate 5r/s per_client=10r/s;',
		'"sni_guard_lookup_rate" directive per_client rate is more than the rate in @server',
		'sni_guard_lookup_rate with a larger per_client share' ],
	[ 'server', 'sni_guard_breaker 0 10s;',
		'"sni_guard_breaker" directive invalid number of errors "0" in @server',
		'sni_guard_breaker with no errors' ],
	[ 'server', 'sni_guard_breaker 5 soon;',
		'"sni_guard_breaker" directive invalid cool-down time "soon" in @server',
		'sni_guard_breaker with a bad time' ],
	[ 'server', 'sni_guard_breaker 5;',
		'"sni_guard_breaker" directive invalid value "5", it must be "off" or a number of errors and a time in @server',
		'sni_guard_breaker with one number' ],
	[ 'server', 'sni_guard_on_error maybe;',
		'"sni_guard_on_error" directive invalid value "maybe", it must be "refuse" or "allow"'
		. ' in @server',
		'sni_guard_on_error maybe' ],
	[ 'server', "sni_guard on; $ready sni_guard_thread_pool nope;",
		'unknown thread pool "nope" in @server',
		'sni_guard_thread_pool naming no thread pool' ],

	# operation

	[ 'server', 'sni_guard_allow bad_name.example;',
		'"sni_guard_allow" directive invalid name "bad_name.example": underscore in @server',
		'sni_guard_allow with an invalid name' ],
	[ 'server', 'sni_guard_allow *.;',
		'"sni_guard_allow" directive invalid name "\*\.": empty name in @server',
		'sni_guard_allow with an empty wildcard' ],
	[ 'server', 'sni_guard_alert bad_certificate;',
		'"sni_guard_alert" directive invalid value "bad_certificate", it must be'
		. ' "internal_error" or "unrecognized_name" in @server',
		'sni_guard_alert with another alert' ],
	[ 'server', 'sni_guard_log_level debug;',
		'"sni_guard_log_level" directive invalid value "debug", it must be "info", "notice",'
		. ' "warn" or "error" in @server',
		'sni_guard_log_level debug' ],
	[ 'server', 'sni_guard_status;',
		'"sni_guard_status" directive is not allowed here in @server',
		'sni_guard_status outside a location' ],
	[ 'location', 'sni_guard_status on;',
		'invalid number of arguments in "sni_guard_status" directive in @location',
		'sni_guard_status with an argument' ],
	[ 'http+location', [ $ready, 'sni_guard_purge nowhere;' ],
		'unknown sni_guard_zone "nowhere" in "sni_guard_purge" in @location',
		'sni_guard_purge of an unknown zone' ],
	[ 'location', 'sni_guard_status; sni_guard_purge;',
		'"sni_guard_purge" directive cannot be used with another content handler in one'
		. ' location in @location',
		'sni_guard_status and sni_guard_purge in one location' ],
	[ 'location', 'sni_guard_purge; proxy_pass http://127.0.0.1:%%PORT_8082%%;',
		'"sni_guard_purge" cannot be used with another content handler in one location'
		. ' in @location',
		'sni_guard_purge replaced by a later proxy_pass' ],
	[ 'location', 'sni_guard_purge "";',
		'"sni_guard_purge" directive needs a zone\'s name, or none for every zone in @location',
		'sni_guard_purge of a zone with an empty name' ],
	[ 'location', 'sni_guard_purge; sni_guard_purge;',
		'"sni_guard_purge" directive is duplicate in @location',
		'sni_guard_purge twice in one location' ],

	# accepted

	[ 'server', "sni_guard on; sni_guard_zone guard:1m;"
		. " sni_guard_lookup https://127.0.0.1:%%PORT_8081%%/check?key=1;"
		. " sni_guard_lookup_trusted_certificate ca.crt; sni_guard_timeout 2s;"
		. " sni_guard_valid 5m; sni_guard_invalid 30s; sni_guard_no_sni refuse;",
		undef,
		'guard on, every directive in the server' ],
	[ 'http+server', [ "sni_guard on; sni_guard_zone guard:1m;"
			. " sni_guard_lookup https://127.0.0.1:%%PORT_8081%%/check;"
			. " sni_guard_lookup_trusted_certificate ca.crt; sni_guard_timeout 2s;"
			. " sni_guard_valid 5m; sni_guard_invalid 30s; sni_guard_no_sni refuse;",
			"sni_guard on; sni_guard_zone other:64k;"
			. " sni_guard_lookup http://127.0.0.1:%%PORT_8082%%/other;"
			. " sni_guard_lookup_trusted_certificate demo.crt;"
			. " sni_guard_timeout 100ms; sni_guard_valid 1h; sni_guard_invalid 0;"
			. " sni_guard_no_sni allow;" ],
		undef,
		'every directive at http level, overridden in one server' ],
	[ 'http+server+server2', [ 'sni_guard on; sni_guard_zone guard:1m;',
			"sni_guard_lookup $lookup;", "sni_guard_lookup $lookup;" ],
		undef,
		'one http-level zone, the same lookup in two servers' ],
	[ 'http+server', [ "$ready sni_guard_timeout 1s; sni_guard_no_sni refuse;"
			. " sni_guard_lookup_trusted_certificate ca.crt;", 'sni_guard off;' ],
		undef,
		'guard off everywhere, other directives present' ],
	[ 'server', 'sni_guard off;',
		undef,
		'sni_guard off without zone or lookup' ],
	[ 'http+server+server2', [ "sni_guard on; $ready sni_guard_breaker 3 5s;",
			'sni_guard_timeout 200ms;', 'sni_guard_timeout 400ms;' ],
		undef,
		'one zone, one breaker, two timeouts' ],
);

my $d = $t->testdir();
make_cert($d, 'localhost');
make_cert($d, 'demo');
$t->write_file('text.pem', "not a certificate\n");
$t->write_file('key.pem', $t->read_file('localhost.key'));
POSIX::mkfifo("$d/fifo.pem", 0600) or die "Can't make $d/fifo.pem: $!";

$t->plan(2 * @cases + 4);

###############################################################################

my $nginx = $ENV{TEST_NGINX_BINARY};
{
	no warnings 'once';    # set by the nginx-tests harness only
	$nginx //= $Test::Nginx::NGINX // '../nginx/objs/nginx';
}

# Runs nginx -t on $conf, a file in the test directory, bounded in time; returns
# "exit N" (or "signal N", "timeout") and what nginx printed.
sub nginx_t {
	my ($conf) = @_;

	my $pid = open(my $out, '-|');
	die "Can't fork: $!\n" unless defined $pid;

	if ($pid == 0) {
		open STDERR, '>&', \*STDOUT or POSIX::_exit(127);
		no warnings 'exec';    # the exit below runs only if exec fails
		exec { $nginx } $nginx, '-t', '-p', "$d/", '-c', $conf, '-e', 'error.log';
		POSIX::_exit(127);
	}

	my $text = '';
	my $done = eval {
		local $SIG{ALRM} = sub { die "timeout\n" };
		alarm(20);
		local $/;
		$text = <$out> // '';
		alarm(0);
		1;
	};
	alarm(0);

	if (!$done) {
		kill 'KILL', $pid;
		close $out;
		return ('timeout', $text);
	}

	close $out;
	my $status = $? & 127 ? 'signal ' . ($? & 127) : 'exit ' . ($? >> 8);
	return ($status, $text);
}

# Writes the configuration of one row; returns the line number of each place.
# $t is passed in: a named sub that closed over it would keep it alive until
# global destruction, too late for the harness's closing checks.
sub write_case {
	my ($t, $file, $where, $snippet) = @_;

	my @where = split /\+/, $where;
	my @snippets = ref $snippet ? @$snippet : ($snippet);
	die "$file: " . @where . " places, " . @snippets . " snippets\n"
		unless @where == @snippets;

	my %fill = map { $_ => '' } @places;
	for my $i (0 .. $#where) {
		die "$file: unknown place $where[$i]\n" unless exists $fill{$where[$i]};
		$fill{$where[$i]} = $snippets[$i];
	}

	(my $conf = $template) =~ s/\@(\w+)\@/$fill{$1}/g;
	$t->write_file_expand($file, $conf);

	my %line;
	my $n = 0;
	for (split /\n/, $t->read_file($file)) {
		$n++;
		$line{$1} = $n if /# \@([\w-]+)$/;
	}
	return \%line;
}

sub check_fails {
	my ($file, $expect, $why, $line) = @_;

	my $re = $expect;
	$re =~ s/\@dir/\Q$d\E/g;
	$re =~ s/\@([\w-]+)/exists $line->{$1} ? "\Q$d\/$file\E:$line->{$1}" : "\@$1"/ge;

	my ($status, $out) = nginx_t($file);
	like($status, qr/^exit [1-9]/, "$why: nginx -t fails");
	like($out, qr/\[emerg\] $re$/m, "$why: says so, where");
}

sub check_passes {
	my ($file, $why) = @_;

	my ($status, $out) = nginx_t($file);
	is($status, 'exit 0', "$why: nginx -t passes");
	like($out, qr/syntax is ok.*\n.*test is successful/, "$why: syntax ok, test successful");
}

my ($bad, $good) = (0, 0);

for my $case (@cases) {
	my ($where, $snippet, $expect, $why) = @$case;

	if (defined $expect) {
		my $file = 'bad-' . ++$bad . '.conf';
		check_fails($file, $expect, $why, write_case($t, $file, $where, $snippet));

	} else {
		my $file = 'good-' . ++$good . '.conf';
		write_case($t, $file, $where, $snippet);
		check_passes($file, $why);
	}
}

# nginx-conf/demo.conf as scripts/demo fills it in.  The module is loaded from
# where TEST_NGINX_GLOBALS loads it; without one there, it is built in.

my ($module) = ($ENV{TEST_NGINX_GLOBALS} // '') =~ /\bload_module\s+([^\s;]+)\s*;/;

open my $fh, '<', '../nginx-conf/demo.conf' or die "Can't open nginx-conf/demo.conf: $!";
my $demo = do { local $/; <$fh> };
close $fh;

if (defined $module) {
	$demo =~ s/\@MODULE\@/$module/g;
} else {
	$demo =~ s/^\s*load_module\s+\@MODULE\@\s*;\s*$//m;
}
$demo =~ s/\@PREFIX\@/$d/g;
$demo =~ s/\@PORT\@/port(8443)/ge;
$demo =~ s/\@LOOKUP_PORT\@/port(8081)/ge;

$t->write_file('demo.conf', $demo);
check_passes('demo.conf', 'nginx-conf/demo.conf');

# nginx-conf/production.conf, the same way.

open $fh, '<', '../nginx-conf/production.conf'
	or die "Can't open nginx-conf/production.conf: $!";
my $production = do { local $/; <$fh> };
close $fh;

if (defined $module) {
	$production =~ s/\@MODULE\@/$module/g;
} else {
	$production =~ s/^\s*load_module\s+\@MODULE\@\s*;\s*$//m;
}
$production =~ s/\@PREFIX\@/$d/g;
$production =~ s/\@PORT_HTTPS\@/'127.0.0.1:' . port(8443)/ge;
$production =~ s/\@PORT_API\@/port(8080)/ge;
$production =~ s!\@LOOKUP\@!'http://127.0.0.1:' . port(8081) . '/v1/domains/check'!ge;

$t->write_file('production.conf', $production);
$t->write_file('default.crt', $t->read_file('localhost.crt'));
$t->write_file('default.key', $t->read_file('localhost.key'));
check_passes('production.conf', 'nginx-conf/production.conf');

###############################################################################
