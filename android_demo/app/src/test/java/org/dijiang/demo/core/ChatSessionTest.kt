package org.dijiang.demo.core

import org.junit.Assert.assertEquals
import org.junit.Assert.assertFalse
import org.junit.Assert.assertTrue
import org.junit.Assert.fail
import org.junit.Test

class ChatSessionTest {
    private val eos = setOf(ChatMl.IM_END)

    private fun session(runner: FakeRunner, maxContextLen: Long = 1L shl 20) =
        ChatSession(runner, eos, maxContextLen)

    private fun ignore(): (String, Double?) -> Unit = { _, _ -> }

    @Test
    fun firstTurnFeedsSystemPromptAndUserTurnOnly() {
        val runner = FakeRunner(listOf(listOf("Hi", "!", ChatMl.IM_END)))
        val s = session(runner)
        val r = s.send("Hello", 64, 0f, ignore())
        assertEquals(ChatTemplateReference.render(listOf("user" to "Hello"), addGenerationPrompt = true), r.fedText)
        assertEquals("Hi!", r.reply)
        assertEquals(EndReason.EOS, r.endReason)
    }

    @Test
    fun multiTurnFeedingEqualsTheTemplateOverTheWholeConversation() {
        val runner = FakeRunner(listOf(
            listOf("Paris", ".", ChatMl.IM_END),
            listOf("About ", "2M", ChatMl.IM_END),
            listOf("Yes", ChatMl.IM_END)))
        val s = session(runner)
        val history = ArrayList<Pair<String, String>>()
        for (question in listOf("Capital of France?", "Population?", "Sure?")) {
            history.add("user" to question)
            val r = s.send(question, 64, 0f, ignore())
            // What the state has seen when the reply starts: the template up to the generation prompt.
            assertEquals(ChatTemplateReference.render(history, true) + r.reply, runner.fed.toString())
            history.add("assistant" to r.reply)
        }
        // Only the closing marker of the last reply is still owed.
        assertEquals(ChatTemplateReference.render(history, false), runner.fed.toString() + ChatMl.CLOSE_REPLY)
        assertEquals(0, runner.resets)
    }

    @Test
    fun laterTurnsFeedOnlyTheNewText() {
        val runner = FakeRunner(listOf(listOf("a", ChatMl.IM_END), listOf("b", ChatMl.IM_END), listOf("c", ChatMl.IM_END)))
        val s = session(runner)
        val first = s.send("one", 8, 0f, ignore())
        val second = s.send("two", 8, 0f, ignore())
        val third = s.send("two", 8, 0f, ignore())
        assertEquals(ChatMl.CLOSE_REPLY + ChatMl.userTurn("two"), second.fedText)
        assertFalse(second.fedText.contains("one"))
        // A turn's prompt does not grow with the conversation.
        assertEquals(second.stats.promptTokens, third.stats.promptTokens)
        assertTrue(first.stats.promptTokens > second.stats.promptTokens) // turn 1 also carries the system prompt
    }

    @Test
    fun positionFollowsTheRunnerStats() {
        val runner = FakeRunner(listOf(listOf("x", "y", "z", ChatMl.IM_END), listOf("w", ChatMl.IM_END)))
        val s = session(runner)
        val r1 = s.send("q", 64, 0f, ignore())
        assertEquals(runner.position, s.position)
        assertEquals(r1.stats.promptTokens + 3, s.position) // x, y, z fed; EOS not
        s.send("q2", 64, 0f, ignore())
        assertEquals(runner.position, s.position)
        assertEquals(2, s.turns)
    }

    @Test
    fun eosIsNeitherShownNorPartOfTheReply() {
        val runner = FakeRunner(listOf(listOf("Hel", "lo", ChatMl.IM_END, "never")))
        val shown = ArrayList<String>()
        val r = session(runner).send("hi", 64, 0f) { piece, _ -> shown.add(piece) }
        assertEquals(listOf("Hel", "lo"), shown)
        assertEquals("Hello", r.reply)
    }

    @Test
    fun eosMergedIntoAPieceKeepsOnlyTheTextBeforeIt() {
        // The Android binding merges pieces while their UTF-8 is incomplete.
        val runner = FakeRunner(listOf(listOf("caf", "é" + ChatMl.IM_END)), eos = "unused")
        val r = session(runner).send("hi", 64, 0f, ignore())
        assertEquals("café", r.reply)
        assertEquals(EndReason.EOS, r.endReason)
    }

    @Test
    fun eosDecodedToNothingStillEndsTheReplyAsEos() {
        val runner = FakeRunner(listOf(listOf("ok", ChatMl.IM_END), listOf("fine", ChatMl.IM_END)), eosDecodesTo = "")
        val s = session(runner)
        val r = s.send("hi", 64, 0f, ignore())
        assertEquals("ok", r.reply)
        assertEquals(EndReason.EOS, r.endReason)
        assertTrue(s.send("and?", 64, 0f, ignore()).fedText.startsWith(ChatMl.CLOSE_REPLY + ChatMl.IM_START + "user"))
    }

    @Test
    fun maxTokensCutsTheReplyAndTheCutPieceIsFedNextTurn() {
        val runner = FakeRunner(listOf(listOf("a", "b", "c", "d", ChatMl.IM_END), listOf("e", ChatMl.IM_END)))
        val s = session(runner)
        val r = s.send("q1", 3, 0f, ignore())
        assertEquals("abc", r.reply)
        assertEquals(EndReason.MAX_TOKENS, r.endReason)
        val next = s.send("q2", 3, 0f, ignore())
        assertEquals("c" + ChatMl.CLOSE_REPLY + ChatMl.userTurn("q2"), next.fedText)
        val history = listOf("user" to "q1", "assistant" to "abc", "user" to "q2", "assistant" to "e")
        assertEquals(ChatTemplateReference.render(history, false), runner.fed.toString() + ChatMl.CLOSE_REPLY)
    }

    @Test
    fun cancelStopsAfterTheNextPiece() {
        val runner = FakeRunner(listOf(listOf("a", "b", "c", ChatMl.IM_END)))
        val s = session(runner)
        val r = s.send("q", 64, 0f) { piece, _ -> if (piece == "a") s.cancel() }
        assertEquals("a", r.reply)
        assertEquals(EndReason.CANCELLED, r.endReason)
    }

    @Test
    fun fullContextEndsTheReplyAndRefusesAnotherTurn() {
        val prompt = ChatMl.systemBlock(ChatMl.DEFAULT_SYSTEM_PROMPT) + ChatMl.userTurn("q")
        val runner = FakeRunner(listOf(listOf("a", "b", "c", "d")), maxContextLen = prompt.length + 3L)
        val s = session(runner, maxContextLen = prompt.length + 3L)
        val r = s.send("q", 64, 0f, ignore())
        assertEquals(EndReason.CONTEXT_FULL, r.endReason)
        assertTrue(s.contextFull)
        try {
            s.send("more", 64, 0f, ignore())
            fail("a full context must refuse another turn")
        } catch (e: IllegalStateException) {
            assertTrue(e.message!!.contains("new chat"))
        }
    }

    @Test
    fun resetStartsOverWithTheSystemPrompt() {
        val runner = FakeRunner(listOf(listOf("a", ChatMl.IM_END), listOf("b", ChatMl.IM_END)))
        val s = session(runner)
        s.send("q1", 8, 0f, ignore())
        s.reset()
        assertEquals(0L, s.position)
        assertEquals(1, runner.resets)
        val r = s.send("q2", 8, 0f, ignore())
        assertEquals(ChatTemplateReference.render(listOf("user" to "q2"), true), r.fedText)
    }

    @Test
    fun runnerFailureResetsTheConversationAndRethrows() {
        val runner = FakeRunner(listOf(listOf("a", ChatMl.IM_END), listOf("b", ChatMl.IM_END)), failOnCall = 1)
        val s = session(runner)
        s.send("q1", 8, 0f, ignore())
        try {
            s.send("q2", 8, 0f, ignore())
            fail("the runner's error must reach the caller")
        } catch (e: IllegalStateException) {
            assertEquals("runner failed", e.message)
        }
        assertEquals(0L, s.position)
        assertEquals(1, runner.resets)
    }

    @Test
    fun liveRateComesWithThePiecesAndTheFinalRateFromTheStats() {
        var now = 0L
        val runner = FakeRunner(listOf(listOf("a", "b", "c", ChatMl.IM_END)))
        val s = ChatSession(runner, eos, 1L shl 20, nowNanos = { now += 50_000_000L; now })
        val rates = ArrayList<Double?>()
        val r = s.send("q", 64, 0f) { _, rate -> rates.add(rate) }
        assertEquals(null, rates[0])
        assertEquals(20.0, rates[2]!!, 1e-9) // one piece per 50 ms
        // FakeRunner: a, b, c fed back over four 10 ms samples (the EOS one included).
        assertEquals(3 * 1000.0 / 40, r.decodeTokensPerSecond!!, 1e-9)
    }

    @Test
    fun maxNewTokensMustBePositive() {
        try {
            session(FakeRunner(listOf(listOf("a")))).send("q", 0, 0f, ignore())
            fail("0 max tokens must be refused")
        } catch (e: IllegalArgumentException) {
            assertTrue(e.message!!.contains("maxNewTokens"))
        }
    }
}
