#!/usr/bin/perl

# Tests for sni_guard: a decision is made once per connection.  When TLS 1.3
# needs a HelloRetryRequest (the client's key share is for a group the server
# does not take), OpenSSL calls the ClientHello callback again for the second
# ClientHello on the same connection; the module reuses its first decision:
# one lookup per connection, none for a cached name.  A second ClientHello may
# not bring in another name unchecked.

###############################################################################

use warnings;
use strict;

use Test::More;

use IO::Select;
use IO::Socket::INET;
use POSIX qw/ WNOHANG /;
use Time::HiRes qw/ time /;

BEGIN { use FindBin; chdir($FindBin::Bin); }

use lib 'lib';
use Test::Nginx;
use Test::Nginx::SNIGuard qw/ :all /;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

eval { require Net::SSLeay; };
plan(skip_all => 'Net::SSLeay not installed') if $@;

my $t = Test::Nginx->new()->has(qw/http http_ssl/)->has_daemon('openssl');

# The server takes X25519 only; a client that sends a P-256 key share first
# gets a HelloRetryRequest asking for X25519.

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
        ssl_protocols       TLSv1.2 TLSv1.3;
        ssl_ecdh_curve      X25519;

        sni_guard on;

        location / {
            return 200 "name $ssl_server_name";
        }
    }
}

EOF

my $d = $t->testdir();
make_cert($d, 'localhost');

# fresh.example.com is registered but its answer is not cached (ttl 0): were
# the callback to decide again on the second ClientHello, it would have to ask
# the service again.
lookup_conf($d,
	registered => [ 'shop.example.com', 'fresh.example.com' ],
	json => { 'fresh.example.com' => '{"ttl": 0}' });

$t->run_daemon(\&lookup_daemon, port(8081), $d);
$t->waitforfile("$d/lookup.pid") or die "lookup service did not start";

$t->plan(18)->run();

###############################################################################

my $port = port(8443);

# The random of a HelloRetryRequest (RFC 8446, 4.1.3), as openssl -trace
# prints it: the first 4 bytes as gmt_unix_time, the rest as random_bytes.
my $HRR_TIME = '0xCF21AD74';
my $HRR_RANDOM = 'E59A6111BE1D8C021E65B891C2A211167ABB8C5E079E09E2C8A8339C';

# One handshake with the system openssl: TLS 1.3, groups P-256 then X25519,
# so that the only key share sent is P-256's.  stdin is empty, so s_client
# ends after the handshake.  Returns what the -trace output shows.
sub s_client {
	my ($name) = @_;

	my $out = "$d/s_client.out";
	my $pid = fork() // die "fork: $!";
	if ($pid == 0) {
		open STDIN, '<', '/dev/null' or POSIX::_exit(126);
		open STDOUT, '>', $out or POSIX::_exit(126);
		open STDERR, '>&', \*STDOUT or POSIX::_exit(126);
		no warnings 'exec';
		exec 'openssl', 's_client', '-tls1_3', '-groups', 'P-256:X25519',
			'-servername', $name, '-connect', "127.0.0.1:$port", '-trace';
		POSIX::_exit(127);
	}

	my $deadline = time() + 10;
	until (waitpid($pid, WNOHANG) == $pid) {
		if (time() > $deadline) {
			kill 'KILL', $pid;
			waitpid($pid, 0);
			last;
		}
		select undef, undef, undef, 0.02;
	}

	open my $fh, '<', $out or die "Can't open $out: $!";
	my $text = do { local $/; <$fh> };
	close $fh;
	my @records = split /^(?=(?:Sent|Received) Record$)/m, $text;
	my @sent = grep { /^Sent Record/ } @records;
	my @received = grep { /^Received Record/ } @records;

	return {
		hellos => scalar(grep { /^\s+ClientHello, Length=/m } @sent),
		hrr => scalar(grep { /ServerHello.*gmt_unix_time=$HRR_TIME\s+
			random_bytes\ \(len=28\):\ $HRR_RANDOM/sx } @received),
		done => $text =~ /^New, TLSv1\.3, Cipher is TLS_/m ? 1 : 0,
		refused => $text =~ /alert internal error/ ? 1 : 0,
		text => $text,
	};
}

sub shows {
	my ($r) = @_;
	return "$r->{hellos} ClientHello, HRR $r->{hrr}, "
		. ($r->{done} ? 'handshake done' : $r->{refused} ? 'refused' : 'neither');
}

# the client does get a HelloRetryRequest

my $r = s_client('shop.example.com');
is($r->{hrr}, 1, 'new registered name: the server sent a HelloRetryRequest')
	or diag($r->{text});
is(shows($r), '2 ClientHello, HRR 1, handshake done',
	'new registered name: second ClientHello, handshake done');
is(lookup_count($d, 'shop.example.com'), 1,
	'new registered name: one lookup for both ClientHellos');

# an answer that is not cached: one lookup per connection, not per ClientHello

$r = s_client('fresh.example.com');
is(shows($r), '2 ClientHello, HRR 1, handshake done',
	'uncached registered name: HelloRetryRequest, handshake done');
is(lookup_count($d, 'fresh.example.com'), 1,
	'uncached registered name: one lookup for both ClientHellos');

$r = s_client('fresh.example.com');
is(shows($r), '2 ClientHello, HRR 1, handshake done',
	'uncached registered name again: handshake done');
is(lookup_count($d, 'fresh.example.com'), 2,
	'uncached registered name: the next connection asks again');

# an unregistered name is refused on the first ClientHello, so the server
# never gets as far as a HelloRetryRequest

$r = s_client('nope.example.com');
is(shows($r), '1 ClientHello, HRR 0, refused',
	'new unregistered name: refused at the first ClientHello, no HelloRetryRequest');
is(lookup_count($d, 'nope.example.com'), 1, 'new unregistered name: one lookup');

# cached answers

$r = s_client('shop.example.com');
is(shows($r), '2 ClientHello, HRR 1, handshake done',
	'cached registered name: HelloRetryRequest, handshake done');
is(lookup_count($d, 'shop.example.com'), 1, 'cached registered name: no lookup');

$r = s_client('nope.example.com');
is(shows($r), '1 ClientHello, HRR 0, refused', 'cached unregistered name: refused');
is(lookup_count($d, 'nope.example.com'), 1, 'cached unregistered name: no lookup');

# A hand-made client that changes the server name in its second ClientHello
# (RFC 8446 4.1.2 forbids it; OpenSSL 3.0 does not check).  The first name
# is registered; the second is not, and must not get a handshake without being
# checked: the connection is to be refused, by the module or by OpenSSL.  With
# the same name twice, the same client gets its ServerHello.

my $x = retry_with_other_name('shop.example.com', 'shop.example.com');
is("$x->{first}, then $x->{second}", 'hello retry request, then server hello',
	'same name after HRR (control): the hand-made retry is answered');

$x = retry_with_other_name('shop.example.com', 'evil.example.com');
is($x->{first}, 'hello retry request',
	'other name after HRR: the first ClientHello got a HelloRetryRequest');
like($x->{second}, qr/^alert \d+$/,
	'other name after HRR: an unregistered second name is refused');
is(lookup_count($d, 'shop.example.com'), 1,
	'other name after HRR: the first name was answered from the cache');

# The same with a real TLS client, OpenSSL's: the name it is given after its
# first ClientHello went out goes into its second one.  The right answer is a
# refusal; being served says that nginx selected the server, and served the
# page, for a name that was never checked.

like(switch_name('shop.example.com', 'evil2.example.com'), qr/^refused/,
	'real client, other name after HRR: an unregistered second name is refused');

###############################################################################

# A raw TLS 1.3 ClientHello; key share for one group, the same random and
# session id for both hellos of a connection, as RFC 8446 requires.
sub hello_record {
	my ($name, $group, $share, $random, $session_id) = @_;

	my $ext = sub { pack('n n/a*', @_) };
	my $exts = $ext->(0, sni_ext($name))
		. $ext->(10, pack('n/a*', pack('n*', 0x0017, 0x001d)))
		. $ext->(13, pack('n/a*', pack('n*', 0x0804, 0x0401, 0x0403)))
		. $ext->(43, pack('C/a*', pack('n', 0x0304)))
		. $ext->(45, pack('C/a*', "\x01"))
		. $ext->(51, pack('n/a*', pack('n n/a*', $group, $share)));

	my $body = pack('n a32 C/a* n/a* C/a* n/a*', 0x0303, $random, $session_id,
		pack('n*', 0x1301, 0x1302, 0x1303), "\x00", $exts);
	my $msg = pack('C', 1) . substr(pack('N', length $body), 1) . $body;

	return pack('C n n/a*', 22, 0x0301, $msg);
}

sub random_bytes {
	return pack('C*', map { int rand 256 } 1 .. $_[0]);
}

# Takes the next TLS record off the connection; what was read past it stays
# in $$buf for the next call.  Waits at most 5 s; '' on EOF or timeout.
sub read_record {
	my ($sock, $buf) = @_;

	my $sel = IO::Select->new($sock);
	my $deadline = time() + 5;

	while (time() < $deadline) {
		if (length($$buf) >= 5) {
			my $len = unpack('x3 n', $$buf);
			return substr($$buf, 0, 5 + $len, '') if length($$buf) >= 5 + $len;
		}
		$sel->can_read($deadline - time()) or next;
		my $n = sysread($sock, $$buf, 65536, length $$buf);
		return '' unless $n;
	}

	return '';
}

sub describe {
	my ($rec) = @_;

	return 'nothing' if length($rec) < 6;
	my ($type, $first) = unpack('C x4 C', $rec);

	return 'alert ' . unpack('x6 C', $rec) if $type == 21 && length($rec) >= 7;
	return 'change cipher spec' if $type == 20;
	return "record type $type" if $type != 22;
	return "handshake type $first" if $first != 2;

	my $random = uc unpack('H*', substr($rec, 11, 32));
	return $random eq substr($HRR_TIME, 2) . $HRR_RANDOM
		? 'hello retry request' : 'server hello';
}

sub retry_with_other_name {
	my ($first_name, $second_name) = @_;

	my $sock = IO::Socket::INET->new(
		PeerAddr => "127.0.0.1:$port", Proto => 'tcp', Timeout => 5,
	) or return { first => "connect: $!", second => 'not sent' };
	local $SIG{PIPE} = 'IGNORE';

	my ($random, $session_id) = (random_bytes(32), random_bytes(32));

	# P-256 share (an uncompressed point's size): the server skips it unread
	syswrite($sock, hello_record($first_name, 0x0017, "\x04" . random_bytes(64),
		$random, $session_id));

	my $buf = '';
	my %r = (first => describe(read_record($sock, \$buf)), second => 'not sent');
	return \%r if $r{first} ne 'hello retry request';

	# the server's middlebox-compatibility change_cipher_spec, if any, is
	# read in front of the answer below

	syswrite($sock, pack('C n n/a*', 20, 0x0303, "\x01"));
	syswrite($sock, hello_record($second_name, 0x001d, random_bytes(32),
		$random, $session_id));

	for (1 .. 3) {
		$r{second} = describe(read_record($sock, \$buf));
		last if $r{second} ne 'change cipher spec';
	}

	close $sock;
	return \%r;
}

# A TLS 1.3 handshake by OpenSSL, through Net::SSLeay, that offers P-256 and
# X25519 with a key share for P-256 only, so that it gets a HelloRetryRequest.
# Until the first ClientHello has gone out, OpenSSL reads from an empty pipe
# instead of the connection, so that it cannot have seen the server's answer
# when the name is changed.  Returns 'served NAME' with the name in the page,
# 'refused: ERROR' for a handshake that failed, or 'failed: WHY'.
sub switch_name {
	my ($first_name, $second_name) = @_;

	my $sock = IO::Socket::INET->new(
		PeerAddr => "127.0.0.1:$port", Proto => 'tcp', Timeout => 5,
	) or return "failed: connect: $!";
	pipe(my $empty, my $unused) or return "failed: pipe: $!";
	$_->blocking(0) for $sock, $empty;
	local $SIG{PIPE} = 'IGNORE';

	Net::SSLeay::initialize();
	my $ctx = Net::SSLeay::CTX_new_with_method(Net::SSLeay::TLS_client_method())
		or return 'failed: SSL_CTX_new';
	my $ssl;
	my $result = eval {
		Net::SSLeay::CTX_set_min_proto_version($ctx, Net::SSLeay::TLS1_3_VERSION());
		Net::SSLeay::CTX_set1_groups_list($ctx, 'P-256:X25519')
			or die "groups\n";
		$ssl = Net::SSLeay::new($ctx) or die "SSL_new\n";
		Net::SSLeay::set_rfd($ssl, fileno $empty);
		Net::SSLeay::set_wfd($ssl, fileno $sock);
		Net::SSLeay::set_tlsext_host_name($ssl, $first_name);

		my $rc = Net::SSLeay::connect($ssl);
		$rc == -1 && Net::SSLeay::get_error($ssl, $rc) == Net::SSLeay::ERROR_WANT_READ()
			or die "first ClientHello not sent ($rc)\n";

		Net::SSLeay::set_tlsext_host_name($ssl, $second_name);
		Net::SSLeay::set_rfd($ssl, fileno $sock);

		ssl_io($ssl, $sock, sub { Net::SSLeay::connect($ssl) })
			or return 'refused: ' . ssl_error();

		my $request = "GET / HTTP/1.0\r\nHost: $second_name\r\n\r\n";
		ssl_io($ssl, $sock, sub { Net::SSLeay::write($ssl, $request) })
			or return 'failed: write: ' . ssl_error();

		my $reply = '';
		for (1 .. 100) {
			my $chunk;
			ssl_io($ssl, $sock, sub {
				$chunk = Net::SSLeay::read($ssl);
				return defined $chunk ? 1 : -1;
			}) or last;
			last unless defined $chunk && length $chunk;
			$reply .= $chunk;
		}

		return $reply =~ /^name (\S+)$/m ? "served $1" : "failed: reply \"$reply\"";
	};
	$result //= 'failed: ' . $@;

	Net::SSLeay::free($ssl) if $ssl;
	Net::SSLeay::CTX_free($ctx);
	close $sock;
	return $result;
}

# Runs an SSL call on a non-blocking socket until it succeeds (true), fails
# (false) or 5 s have passed (false).
sub ssl_io {
	my ($ssl, $sock, $call) = @_;

	my $sel = IO::Select->new($sock);
	my $deadline = time() + 5;

	while (time() < $deadline) {
		my $rc = $call->();
		return 1 if $rc > 0;
		my $err = Net::SSLeay::get_error($ssl, $rc);
		if ($err == Net::SSLeay::ERROR_WANT_READ()) {
			$sel->can_read($deadline - time());
		} elsif ($err == Net::SSLeay::ERROR_WANT_WRITE()) {
			$sel->can_write($deadline - time());
		} else {
			return 0;
		}
	}

	return 0;
}

sub ssl_error {
	my @errors;
	while (my $e = Net::SSLeay::ERR_get_error()) {
		push @errors, Net::SSLeay::ERR_error_string($e);
	}
	return join('; ', @errors) || 'no error queued';
}

###############################################################################
