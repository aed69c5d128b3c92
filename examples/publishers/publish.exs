# A backend service's publish that loses nothing, with the `gnat` hex package (Elixir).
#
#   elixir examples/publishers/publish.exs nats://127.0.0.1:4222 epoch.user.42 newMessage '{"id":1}'
#
# Documented, not run: the machines that build and test this project cannot reach Hex, so no test runs
# this script (the Rust and Node examples beside it are run by tests/gateway/publish.rs). It needs
# Elixir 1.16 or later (gnat 1.16) and fetches its packages with Mix.install on first use.
#
# The event is published with JetStream semantics: `Gnat.request/4` publishes the message as `Gnat.pub/4`
# does, with the `headers:` option, plus a reply inbox, and waits for the reply, which for a subject
# stored by a stream is the stream's ack (`{"stream": …, "seq": …}`). The `Nats-Msg-Id` header names this
# one event: when an ack does not come (a failover, a reconnect), the same message is sent again with the
# same id, and the stream drops the copy it already holds. Without an ack there is no way to know whether
# the event was stored.

Mix.install([{:gnat, "~> 1.16"}, {:jason, "~> 1.4"}])

defmodule Publisher do
  # Past this deadline the event is reported as not stored.
  @deadline_ms 10_000
  # How long each attempt waits for its ack.
  @ack_timeout_ms 2_000

  def main([url, subject, event | rest]) do
    payload = Jason.decode!(List.first(rest, "{}"))

    unless is_map(payload) do
      fail("the payload must be a JSON object")
    end

    body = Jason.encode!(%{event: event, payload: payload})
    uri = URI.parse(url)

    # `no_responders: true`: a subject that no stream stores answers at once instead of timing out.
    {:ok, gnat} = Gnat.start_link(%{host: uri.host, port: uri.port || 4222, no_responders: true})

    # One id per event, chosen once, before the first attempt (any string unique per event will do).
    msg_id = Base.url_encode64(:crypto.strong_rand_bytes(16), padding: false)
    deadline = System.monotonic_time(:millisecond) + @deadline_ms
    publish(gnat, subject, body, msg_id, deadline)
  end

  def main(_), do: fail("usage: publish.exs <NATS_URL> <SUBJECT> <EVENT> [PAYLOAD_JSON]")

  defp publish(gnat, subject, body, msg_id, deadline) do
    reply =
      Gnat.request(gnat, subject, body,
        headers: [{"Nats-Msg-Id", msg_id}],
        receive_timeout: @ack_timeout_ms
      )

    case ack(reply) do
      {:ok, stream, seq} ->
        IO.puts("stored in #{stream} at #{seq}")

      {:error, reason} ->
        if System.monotonic_time(:millisecond) < deadline do
          IO.puts(:stderr, "not acked yet (#{inspect(reason)}); sending #{msg_id} again")
          Process.sleep(200)
          publish(gnat, subject, body, msg_id, deadline)
        else
          fail("not stored: #{inspect(reason)}")
        end
    end
  end

  # The stream's answer: an ack, or a JetStream error such as "temporarily unavailable".
  defp ack({:ok, %{body: body}}) do
    case Jason.decode(body) do
      {:ok, %{"stream" => stream, "seq" => seq}} -> {:ok, stream, seq}
      {:ok, %{"error" => error}} -> {:error, error}
      other -> {:error, other}
    end
  end

  # `:timeout` (no ack in time) or `:no_responders` (no stream, or one without a leader for the moment).
  defp ack({:error, reason}), do: {:error, reason}

  defp fail(message) do
    IO.puts(:stderr, message)
    System.halt(1)
  end
end

Publisher.main(System.argv())
